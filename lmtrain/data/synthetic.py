"""The built-in corpus: short stories whose last word needs a long memory.

    tom was watching tv in his room . mary came into the room .
    the dog barked . it was a cold day . mary said hi to tom .

The word after "said hi to" is always the *other* person of the story, named
in its first sentence.  Between the second sentence and the question come
distractor sentences (no names) whose total length is exactly the story's
distance, drawn from [min_distance, max_distance] (uniformly, or for the
training split log-uniformly).  One story per line, so
stories are separated by <eos>.  Everything is generated from a seed by this
module: the same settings always give the same corpus.
"""
import numpy as np

MALE = ["tom", "john", "bob", "jim", "sam", "ben", "max", "joe"]
FEMALE = ["mary", "anna", "lucy", "kate", "emma", "jane", "sara", "lily"]
NAMES = MALE + FEMALE
PLACES = ["room", "kitchen", "garden", "office", "library", "hall"]
ACTIVITIES = ["watching tv", "reading a book", "eating lunch", "playing the piano", "writing a letter",
              "cleaning the floor", "drinking tea", "sleeping", "cooking dinner", "doing homework"]

# Distractor templates; {x} slots are filled from the lists below.  Every
# length from 2 up is available, so any distance can be filled exactly.
FILL = {
    "animal": ["dog", "cat", "bird", "horse", "cow"],
    "sound": ["barked", "slept", "sang", "jumped", "ran away"],
    "adj": ["cold", "warm", "rainy", "quiet", "long", "sunny"],
    "thing": ["lamp", "cup", "book", "clock", "vase", "plate"],
    "furniture": ["table", "shelf", "desk", "chair"],
    "color": ["red", "blue", "green", "white", "old"],
    "vehicle": ["car", "bus", "truck", "bike"],
    "weather": ["rain", "snow", "wind"],
}
TEMPLATES = [
    "silence .",
    "time passed .",
    "the {weather} stopped .",
    "the {animal} {sound} .",
    "it was a {adj} day .",
    "a {vehicle} drove past the house .",
    "the {thing} on the {furniture} was {color} .",
    "outside , the {weather} was getting stronger .",
    "somebody had left a {color} {thing} on the {furniture} .",
]


def _fill(template, rng):
    words = []
    for part in template.split():
        if part.startswith("{"):
            choices = FILL[part[1:-1]]
            words.extend(choices[rng.integers(len(choices))].split())
        else:
            words.append(part)
    return words


def distractors(rng, distance):
    """Name-free sentences with exactly ``distance`` tokens in total."""
    out = []
    remaining = distance
    while remaining >= 2:
        words = None
        while words is None or len(words) > remaining:
            words = _fill(TEMPLATES[rng.integers(len(TEMPLATES))], rng)
        out.extend(words)
        remaining -= len(words)
    if remaining == 1:
        out.append("then")
    return out


def name_pool(num_names):
    """The first ``num_names`` names, alternating male and female."""
    return [n for pair in zip(MALE, FEMALE) for n in pair][:num_names]


def story(rng, distance, names=NAMES):
    """(tokens of one story, index of the answer token)."""
    a, b = rng.choice(len(names), size=2, replace=False)
    a, b = names[a], names[b]
    place = PLACES[rng.integers(len(PLACES))]
    activity = ACTIVITIES[rng.integers(len(ACTIVITIES))].split()
    where = ["in", "his" if a in MALE else "her", "room"] if place == "room" else ["in", "the", place]
    tokens = [a, "was", *activity, *where, "."]
    tokens += [b, "came", "into", "the", place, "."]
    tokens += distractors(rng, distance)
    tokens += [b, "said", "hi", "to"]
    answer = len(tokens)
    tokens += [a, "."]
    return tokens, answer


SPLIT_STREAMS = {"train": 0, "valid": 1, "test": 2, "probe": 3}


def draw_distance(rng, lo, hi, how="uniform"):
    """A distance in [lo, hi]: uniform, or log-uniform (log(d + 1) uniform), which draws short ones as
    often as long ones."""
    if how == "log-uniform":
        return int(np.exp(rng.uniform(np.log(lo + 1), np.log(hi + 2)))) - 1
    return int(rng.integers(lo, hi + 1))


def generate_lines(cfg, split, n=None, distance=None):
    """Stories of one split as text lines.  ``cfg`` is the data.synthetic section."""
    rng = np.random.default_rng([cfg.seed, SPLIT_STREAMS[split]])
    n = n if n is not None else getattr(cfg, f"{split}_stories")
    names = name_pool(cfg.num_names)
    how = cfg.train_distances if split == "train" else "uniform"
    lines = []
    for _ in range(n):
        d = distance if distance is not None else draw_distance(rng, cfg.min_distance, cfg.max_distance, how)
        tokens, _ = story(rng, d, names)
        lines.append(" ".join(tokens))
    return lines


def generate_text(cfg, split):
    return "\n".join(generate_lines(cfg, split)) + "\n"
