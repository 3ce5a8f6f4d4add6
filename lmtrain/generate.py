"""Continuing a prompt with a trained model: greedy, temperature, top-k and top-p sampling."""

import numpy as np

from lmtrain.data.vocab import EOS
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import feed

MAX_PROMPT_TOKENS = 20_000


def encode_prompt(vocab, prompt):
    """(tokens, ids, unknown tokens), tokenized exactly as the training data was."""
    tokens = vocab.reading.words(prompt)
    if not tokens:
        raise LmtrainError('the prompt is empty; give at least one word, e.g. --prompt "the market"')
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise LmtrainError(
            f"the prompt has {len(tokens):,} words; at most {MAX_PROMPT_TOKENS:,} are read "
            f"(an LSTM's memory is far shorter: keep the end that matters)"
        )
    unknown = sorted(set(vocab.unknown(tokens)))
    if len(unknown) == len(set(tokens)):
        raise LmtrainError(
            f"none of the prompt's words is in the vocabulary ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); the model would only see <unk>"
        )
    return tokens, vocab.encode(tokens), unknown


def softmax(logits, temperature=1.0):
    z = logits / temperature
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def pick(logits, rng, temperature=1.0, top_k=None, top_p=None, greedy=False):
    """One token id from next-token logits."""
    if greedy:
        return int(np.argmax(logits))
    p = softmax(logits, temperature)
    if top_k is not None and top_k < len(p):
        cut = np.partition(p, -top_k)[-top_k]
        p = np.where(p >= cut, p, 0.0)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p * cum[-1])) + 1]
        mask = np.zeros_like(p)
        mask[keep] = 1.0
        p = p * mask
    p = p / p.sum()
    return int(rng.choice(len(p), p=p))


def generate(
    model, vocab, prompt, max_tokens=30, temperature=1.0, top_k=None, top_p=None, greedy=False, seed=None, show_top=0
):
    """Continue ``prompt``; returns a dict with the tokens, the continuation and the top next words.

    The prompt is preceded by <eos>, as every line of the training data is.
    """
    tokens, ids, unknown = encode_prompt(vocab, prompt)
    rng = np.random.default_rng(seed)
    state = model.init_state(1)
    logits, state = feed(model, np.concatenate([[vocab.eos_id], ids]), state)
    top = []
    if show_top:
        p = softmax(logits, temperature)
        order = np.argsort(-p, kind="stable")[:show_top]
        top = [(vocab.words[i], float(p[i])) for i in order]
    out = []
    for _ in range(max_tokens):
        nxt = pick(logits, rng, temperature, top_k, top_p, greedy)
        out.append(vocab.words[nxt])
        logits, state = feed(model, [nxt], state)
    return {"prompt_tokens": tokens, "unknown": unknown, "top": top, "continuation": out}


def render(tokens):
    """Tokens as text: <eos> becomes a line break."""
    lines = [[]]
    for t in tokens:
        if t == EOS:
            lines.append([])
        else:
            lines[-1].append(t)
    return "\n".join(" ".join(line) for line in lines)
