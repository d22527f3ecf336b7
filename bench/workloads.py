"""What bench/load.py sends: the prompts of each workload, made from a request's key.

A request's key is (server, round, level, index), and a run has an id (`--run-id`). Its content (the question, the long prompt's
words, the source file to edit) depends on (round, level, index) only, so both servers get the
same work for the same request; its tag, at the start of the user message, names the run and
the server as well, so no prompt is ever sent twice (in a run, or by two runs against the same
server) and no prefix cache serves one request from another. `share` says what a workload shares on purpose: "servers" (both servers get the same
prompt, tag included, for comparing outputs) or "all" (every level and round repeats the same
prompts: a warm prefix cache). A system prompt (`--system-tokens`) is shared on purpose.

Workloads:
- chat: a short question (eight of them in turn), the load generator's first workload;
- prose: an original essay on a topic made from the key (nothing in the prompt to copy);
- code-edit: a ~300-line Python module generated from templates with the key as seed, to be
  returned whole with one function renamed (the output repeats most of the input: what
  speculation from the prompt, and OpenAI's `prediction`, are for).

Standard library only; deterministic across Python versions (random.Random with an int seed)."""

import random

WORKLOADS = ("chat", "prose", "code-edit")
SHARES = ("none", "servers", "all")
# A server's letter in a tag: bench/spec.py compares more than two.
SERVER_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The system message the development model needs (without one, its template inserts its own and
# SmolLM2 answers in French babble: see the README).
SYSTEM = "You are a helpful assistant."

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "Give me advice for learning to cook.",
    "What makes a good friend?",
    "Tell me about the history of maps.",
    "Describe a walk through a forest in autumn.",
    "Explain why the sky is blue.",
]

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river garden lamp"
).split()


def filler(tokens, seed):
    """About `tokens` tokens of English words (one token each for common BPE vocabularies),
    the same for the same seed."""
    out, x = [], seed * 2654435761 % 2**32 or 1
    for _ in range(tokens):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)])
    return " ".join(out)


def tag(server, rnd, level, index, share="none", run_id="0000"):
    """The first line of a request's user message: unique per run, server, round, level and
    index, less what `share` shares. Fixed width, so every tag is about as many tokens long."""
    if share == "all":
        return f"[{run_id} {index:05d}]"
    who = "" if share == "servers" else SERVER_LETTERS[server]
    return f"[{run_id} {who}{rnd:02d}-{level:03d}-{index:05d}]"


def content_seed(rnd, level, index, share="none"):
    """The seed of a request's content: the same on both servers."""
    return index + 1 if share == "all" else (rnd * 1_000 + level) * 100_000 + index + 1


# --- code-edit: a plausible Python module, made from templates -------------------------------

NOUNS = ("order invoice account ledger record batch entry report customer payment item "
         "shipment token session window bucket quota rate limit price refund").split()
VERBS = ("load parse check merge split count filter build render apply settle close "
         "open collect reset scale round match sort group").split()
FIELDS = "amount total weight count size score level priority age".split()

FUNCTION_TEMPLATES = [
    '''def {name}(items, limit={n}):
    """{Verb} the {noun}s of `items`, at most `limit` of them."""
    result = []
    for item in items:
        if len(result) >= limit:
            break
        if item.{field} > {k}:
            result.append(item)
    return result
''',
    '''def {name}({noun}, factor={k}):
    """The {field} of a {noun} scaled by `factor`, never below zero."""
    value = {noun}.{field} * factor
    if value < 0:
        return 0
    return round(value, {d})
''',
    '''def {name}(records):
    """Totals of `records` by {noun}, largest first."""
    totals = {{}}
    for record in records:
        key = record.{noun}_id
        totals[key] = totals.get(key, 0) + record.{field}
    ordered = sorted(totals.items(), key=lambda pair: pair[1], reverse=True)
    return ordered[:{n}]
''',
    '''def {name}(text):
    """Reads a {noun} from one line of `text` (`id;{field}`)."""
    parts = text.strip().split(";")
    if len(parts) != 2:
        raise ValueError(f"expected 2 fields, got {{len(parts)}}: {{text!r}}")
    ident, raw = parts
    return {Noun}(ident=ident, {field}=int(raw))
''',
    '''def {name}(values, window={n}):
    """The moving average of `values` over `window` {noun}s."""
    out = []
    total = 0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
''',
]

CLASS_TEMPLATE = '''@dataclass
class {Noun}:
    """One {noun} as the store keeps it."""

    ident: str
    {field}: int = 0
    {field2}: int = {k}

    def is_{adj}(self):
        return self.{field} >= self.{field2}

    def describe(self):
        return f"{noun} {{self.ident}}: {field}={{self.{field}}}"
'''


def code_file(seed, lines=300):
    """A Python module of about `lines` lines, the same for the same seed, and the names of
    its functions (in the order they are defined)."""
    rng = random.Random(seed)
    nouns = rng.sample(NOUNS, 6)
    out = [f'"""Helpers for the {nouns[0]} and {nouns[1]} store (module {seed % 997})."""', "",
           "from dataclasses import dataclass", "", "LIMIT = %d" % rng.randint(10, 99), "", ""]
    for noun in nouns[:3]:
        fields = rng.sample(FIELDS, 2)
        out += CLASS_TEMPLATE.format(noun=noun, Noun=noun.capitalize(), field=fields[0], field2=fields[1],
                                     k=rng.randint(1, 50), adj=rng.choice(("full", "ready", "due", "late"))).split("\n")
        out.append("")
    names = []
    while len(out) < lines - 12 or len(names) < 2:
        noun = rng.choice(nouns[:3])
        name = f"{rng.choice(VERBS)}_{noun}s_by_{rng.choice(FIELDS)}"
        if name in names:
            continue
        verb = name.split("_")[0]
        template = rng.choice(FUNCTION_TEMPLATES)
        out += template.format(name=name, noun=noun, Noun=noun.capitalize(), Verb=verb.capitalize(),
                               field=rng.choice(FIELDS), n=rng.randint(2, 64), k=rng.randint(1, 9),
                               d=rng.randint(0, 3)).split("\n")
        out.append("")
        names.append(name)
    first, second = names[0], names[len(names) // 2]
    out += ["def main(rows):", f'    """Runs {first} and {second} over `rows`."""',
            f"    picked = {first}(rows)", f"    return {second}(picked)", "", "",
            'if __name__ == "__main__":', "    print(main([]))"]
    return "\n".join(out) + "\n", names


def code_edit(seed, lines=300):
    """(instruction, file): the user message asks for the file back with one function renamed."""
    text, names = code_file(seed, lines)
    old = names[0]
    new = "compute_" + old.split("_", 1)[1]
    instruction = (f"Rename the function `{old}` to `{new}` everywhere in this file and change nothing "
                   "else. Reply with the whole file only, in one ```python block.\n\n"
                   f"```python\n{text}```")
    return instruction, text


def chatml(messages, answer_start=""):
    """`messages` as the development model's chat template (ChatML) renders them, the
    assistant's turn opened and begun with `answer_start`: a prompt for /v1/completions that
    starts the answer itself. SmolLM2 describes a long file it is asked to repeat in a chat
    request, and copies it once its answer has begun with the file's first line."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n{answer_start}"


def prose(seed, words=400):
    rng = random.Random(seed)
    topic = f"the {rng.choice(('quiet', 'hidden', 'early', 'long', 'strange'))} {rng.choice(WORDS)} " \
            f"of a {rng.choice(WORDS)} by the {rng.choice(WORDS)}"
    return (f"Write an original essay of about {words} words on {topic}. Use your own words and "
            "do not repeat these instructions.")


def request(workload, key, share="none", prompt_tokens=0, system_tokens=0, file_lines=300, run_id="0000",
            system=False):
    """(messages, prediction): what one request sends. `key` is (server, round, level, index);
    `prediction` is the file of a code-edit request (None for the others). `system` puts SYSTEM
    first (shared on purpose, like `system_tokens`' background, which follows it)."""
    server, rnd, level, index = key
    seed = content_seed(rnd, level, index, share)
    prediction = None
    if workload == "code-edit":
        body, prediction = code_edit(seed, file_lines)
    elif workload == "prose":
        body = prose(seed)
    else:
        body = PROMPTS[index % len(PROMPTS)]
    if prompt_tokens:
        body = f"{filler(prompt_tokens, seed)}\n\n{body}"
    out = [{"role": "user", "content": f"{tag(server, rnd, level, index, share, run_id)} {body}"}]
    if system_tokens:
        out.insert(0, {"role": "system", "content": f"{SYSTEM} Background: " + filler(system_tokens, 0)})
    elif system:
        out.insert(0, {"role": "system", "content": SYSTEM})
    return out, prediction
