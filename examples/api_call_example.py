"""Call `loralab api` with the official openai client: one plain reply, then a streamed one.

    loralab api model_name_or_path=builtin:smollm2-135m-instruct --adapter tuned=runs/demo/adapter
    LORALAB_API_URL=http://127.0.0.1:8000/v1 python examples/api_call_example.py [MODEL]

Base URL: OPENAI_BASE_URL or LORALAB_API_URL (default http://127.0.0.1:8000/v1).
Key: API_KEY (what the server was started with; any text when the server has none).
MODEL: a model id from /v1/models (default: the first one, the base model).
"""

import os
import sys

from openai import OpenAI

base_url = os.environ.get("OPENAI_BASE_URL") or os.environ.get("LORALAB_API_URL") or "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY") or "no-key")

models = [m.id for m in client.models.list()]
model = sys.argv[1] if len(sys.argv) > 1 else models[0]
print(f"models: {models}; using {model}")
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give three tips for staying healthy."},
]

# Non-streaming: the whole reply at once, with token counts.
reply = client.chat.completions.create(model=model, messages=messages, max_tokens=128, temperature=0)
print(reply.choices[0].message.content)
print(f"[finish_reason={reply.choices[0].finish_reason}, usage={reply.usage.model_dump()}]")

# Streaming: print the reply as it is generated.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=128, temperature=0.7, top_p=0.9, seed=0, stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.choices and chunk.choices[0].finish_reason:
        print(f"\n[finish_reason={chunk.choices[0].finish_reason}]")
