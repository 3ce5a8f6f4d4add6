"""Probes that show why the LSTM works: long-range recall and how far gradients reach back.

recall: on held-out stories of the built-in corpus, how often the model ranks
    the right name first after "said hi to", per distance (distractor tokens
    between the name and the question); name_errors says which names it gets
    wrong, and what it answers instead.
gradflow: for a loss at the last step of a window, the norm of its gradient
    with respect to the hidden state (and the LSTM's cell state) k steps
    earlier, averaged over windows of real data, and the fitted per-step
    log-decay rate: the slope of log(norm) against k.
"""

import json
from collections import Counter

import numpy as np

from lmtrain.backend import to_numpy
from lmtrain.data import synthetic
from lmtrain.data.batching import eval_streams
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import feed, stream

PROBE_STREAM = 3  # the synthetic corpus' "probe" stream: never part of train, valid or test


def held_out_stories(synth_cfg, distance, n, exclude):
    """``n`` stories at exactly ``distance``, drawn from the probe stream and absent from ``exclude``."""
    rng = np.random.default_rng([synth_cfg.seed, PROBE_STREAM, distance])
    names = synthetic.name_pool(synth_cfg.num_names)
    out = []
    while len(out) < n:
        tokens, answer = synthetic.story(rng, distance, names)
        if " ".join(tokens) not in exclude:
            out.append((tokens, answer))
    return out


def _story_ids(vocab, tokens):
    """A story's words as ids, normalised as the vocabulary was built."""
    return vocab.encode([vocab.normalize(t) for t in tokens])


def stream_answers(model, vocab, stories):
    """The model's first-ranked word after "said hi to" in every story but the first (which has no context),
    the stories read one after another with the state carried, as in training."""
    ids, answers = [vocab.eos_id], []
    for tokens, answer in stories:
        answers.append(len(ids) + answer)
        ids.extend(_story_ids(vocab, tokens))
        ids.append(vocab.eos_id)
    preds = []
    stream(
        model,
        np.asarray(ids, np.int32)[:, None],
        512,
        on_window=lambda w: preds.append(to_numpy(model.scores(w.out).argmax(axis=1))),
    )
    preds = np.concatenate(preds)
    return [vocab.words[int(preds[p - 1])] for p in answers[1:]]


def _prompt_answers(model, vocab, stories):
    """The first-ranked word after "said hi to" in each story read alone from an empty state, after <eos>, as
    `lmtrain generate` reads a prompt."""
    out = []
    for tokens, answer in stories:
        prompt = [vocab.eos_id] + list(_story_ids(vocab, tokens[:answer]))
        logits, _ = feed(model, prompt, model.init_state(1))
        out.append(vocab.words[int(np.argmax(logits))])
    return out


def recall(model, vocab, cfg, distances, n=200, mode="stream", answers=None):
    """[{distance, accuracy, stories, chance}] for a model trained on the built-in corpus.

    ``mode`` "stream": the held-out stories are read in sequence with the
    state carried, as the model was trained and as perplexity is measured;
    "prompt": each story alone from an empty state, as `lmtrain generate`.
    ``answers``, a list, receives (expected name, answered word, speaker) for every scored story.
    """
    if cfg.data.source != "synthetic":
        raise LmtrainError(
            f"the recall probe needs a model trained on the built-in stories "
            f"(data.source: synthetic); this one was trained on '{cfg.data.source}'"
        )
    synth = cfg.data.synthetic
    train = set(synthetic.generate_lines(synth, "train"))
    rows = []
    for d in distances:
        if mode == "stream":
            stories = held_out_stories(synth, d, n + 1, train)
            got, stories = stream_answers(model, vocab, stories), stories[1:]
        else:
            stories = held_out_stories(synth, d, n, train)
            got = _prompt_answers(model, vocab, stories)
        # In "a ... b came into ... b said hi to a", the speaker b is four tokens before the answer a.
        scored = [(vocab.normalize(t[a]), word, vocab.normalize(t[a - 4])) for (t, a), word in zip(stories, got)]
        hits = sum(expected == word for expected, word, _ in scored)
        if answers is not None:
            answers.extend(scored)
        rows.append(
            {"distance": d, "accuracy": hits / n, "stories": n, "mode": mode, "chance": 1.0 / (synth.num_names - 1)}
        )
    return rows


def name_errors(answers):
    """Which names a model gets wrong: from ``recall``'s (expected, answered, speaker) triples,
    {"stories", "wrong", "speaker_answers" (wrong answers that name the speaker: roles swapped),
    "names": {expected name: {"stories", "wrong", "answered" (how often the model gave this name)}}, worst first,
    "confusions": [(expected, answered, count)], most frequent first}."""
    wrong = [(e, w, s) for e, w, s in answers if e != w]
    told, missed = Counter(e for e, _, _ in answers), Counter(e for e, _, _ in wrong)
    given = Counter(w for _, w, _ in answers)
    order = sorted(told, key=lambda name: (-missed[name] / told[name], name))
    return {
        "stories": len(answers),
        "wrong": len(wrong),
        "speaker_answers": sum(w == s for _, w, s in wrong),
        "names": {name: {"stories": told[name], "wrong": missed[name], "answered": given[name]} for name in order},
        "confusions": [(e, w, c) for (e, w), c in Counter((e, w) for e, w, _ in wrong).most_common()],
    }


def seed_groups(configs):
    """{group name: [labels]} for ``configs`` (label -> Config): models whose configs differ only in the
    seed and the run's name form one group, named after the cell and the first run."""
    groups = {}
    for label, cfg in configs.items():
        d = cfg.to_dict()
        del d["seed"], d["output"]
        key = json.dumps(d, sort_keys=True)
        if key not in groups:
            groups[key] = (f"{cfg.model.cell} ({cfg.output.name})", [])
        groups[key][1].append(label)
    return {f"{name}, {len(members)} seeds": members for name, members in groups.values()}


def gradflow(model, ids, steps=100, batches=10, batch_size=20, layer=-1):
    """Mean gradient norms at the states of ``layer``, k = 0..steps steps before a last-step loss.

    Windows of ``steps`` tokens are read in order from ``ids`` over
    ``batch_size`` streams; the state carries from one window to the next
    without gradient, as in evaluation, so each window starts from a realistic
    state.  k = 0 is the state after the last input, k = steps the state the
    window started from.  The model must have the reference layers (the step hook of
    ``Recurrent.backward`` reads the gradient at every step, which the fast path's kernels never form).
    """
    data, _ = eval_streams(ids, batch_size)
    T = steps
    if len(data) - 1 < T:
        raise LmtrainError(
            f"--steps {steps} needs windows of {T} tokens per stream, but the data gives "
            f"{len(data) - 1} per stream over {batch_size} streams"
        )
    n = min(batches, (len(data) - 1) // T)
    weights = np.zeros((n * T, batch_size), np.float32)
    weights[T - 1 :: T] = 1.0  # the loss of each window's last step only
    sums = {}

    def probe(window):
        records = []  # last step first: record k is k steps before the loss
        dstate0 = model.backward(step_hooks={layer: lambda t, grads: records.append(grads)})[layer]
        records.append(dict(zip(records[0], dstate0)))  # k = steps: the window's initial state
        for k, rec in enumerate(records):
            for name, g in rec.items():
                norms = np.linalg.norm(to_numpy(g).astype(np.float64), axis=1)
                sums.setdefault(name, np.zeros(T + 1))[k] += norms.mean()

    stream(model, data[: n * T + 1], T, weights, on_window=probe, grad=True)
    return {name: s / n for name, s in sums.items()}


def decay_rate(norms, skip=1):
    """Least-squares slope of log(norm) against k (per-step log-decay; < 0 vanishing, > 0 exploding).

    The first ``skip`` steps are left out: at k = 0 the gradient has not yet
    gone through a recurrent step.
    """
    k = np.arange(len(norms))[skip:]
    y = np.log(np.maximum(np.asarray(norms)[skip:], 1e-300))
    return float(np.polyfit(k, y, 1)[0])
