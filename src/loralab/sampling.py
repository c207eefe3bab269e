"""Choosing each row's next token: argmax for greedy rows, each sampling row with its own knobs and RNG.

Runs on whatever device the logits are on. Scores are taken in float32 (bf16 logits would round the
sampling distribution), and a row whose knobs make its distribution degenerate fails alone: its
error is returned beside the other rows' tokens, so one request never breaks its batch mates.
"""

from __future__ import annotations


class SamplingError(ValueError):
    """A row's sampling distribution could not be formed (non-finite or all-zero probabilities)."""


def choose_tokens(rows: list, logits) -> tuple[list[int], dict[int, Exception]]:
    """The next token of every row (`logits`: [rows, vocab]) and the rows whose choice failed (index -> error)."""
    tokens = logits.argmax(-1).tolist()  # greedy rows need nothing more (the one host sync of a step)
    failed: dict[int, Exception] = {}
    for i, r in enumerate(rows):
        s = r.settings
        if s.do_sample or s.repetition_penalty != 1.0:
            try:
                tokens[i] = pick_token(r, logits[i])
            except (RuntimeError, ValueError) as e:
                failed[i] = e
    return tokens, failed


def pick_token(r, scores) -> int:
    """One row's next token with repetition penalty, temperature, top-k and top-p (in HF's order)."""
    import torch

    s = r.settings
    scores = scores.to(torch.float32, copy=True)  # edited below; bf16 logits would round the distribution
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(r.prompt + r.tokens, dtype=torch.long, device=scores.device)
        hit = scores[seen]
        scores[seen] = torch.where(hit < 0, hit * s.repetition_penalty, hit / s.repetition_penalty)
    if not s.do_sample:
        return int(scores.argmax())
    # Shifted so the best score is 0 before dividing: a tiny temperature then gives -inf for the others
    # instead of inf - inf = NaN (the distribution is the same: softmax does not see a shift).
    scores = (scores - scores.max()) / s.temperature
    if 0 < s.top_k < scores.shape[-1]:
        scores[scores < torch.topk(scores, s.top_k).values[-1]] = -float("inf")
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # tokens after the top_p mass is reached
        scores[order[drop]] = -float("inf")
    probs = scores.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError(
            f"sampling: temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k} give no usable distribution"
        )
    return int(torch.multinomial(probs, 1, generator=row_generator(r, probs.device))[0])


def row_generator(r, device):
    """A seeded row's own RNG on the logits' device (None: torch's global RNG), made at its first sample."""
    import torch

    if r.settings.seed is None:
        return None
    if r.generator is None or r.generator.device != torch.device(device):
        r.generator = torch.Generator(device=device).manual_seed(r.settings.seed)
    return r.generator
