"""Deterministic, seeded benchmark workloads (pure data; no network, no HTTP).

Four shapes, all expressed as `ChatThread`s that a load generator replays turn by turn:

- `multi_turn_threads`: like KubeAI's prefix-hash study. Each thread is a conversation of 5-30 user
  messages totalling 500-3000 characters; each turn appends the next user message to the history,
  streams a completion (max 40 tokens) and appends the reply. Later turns re-send everything before
  them, so a replica that saw the thread before has most of the prompt in its prefix cache.
- `shared_prefix_threads`: groups of users share one long system prompt, each asks their own
  questions (a product assistant, a support bot). Sharing sits in the system prompt.
- `system_prompt_threads`: every request is one system prompt of a few thousand tokens, shared by
  all users of that application, plus one unique short question (single turn, no history). The
  first user message differs on every request, so KubeAI's key scatters them; a key taken from the
  conversation's start sends each application's requests where its system prompt is cached.
- `unique_prompt_threads`: the low-sharing control. Every request is a fresh, unique prompt with no
  history (`stateless`), so where it is routed should not matter.

Text is generated from small topic vocabularies and sentence templates: varied enough that threads
differ from their first characters (prefix-hash routing keys on the first user message), cheap, and
identical for the same seed on every machine. Thread i depends only on the seed and on threads
before it, so a smaller workload is a prefix of a larger one with the same seed.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

MULTI_TURN_MESSAGES = (5, 30)
MULTI_TURN_CHARS = (500, 3000)
DEFAULT_MAX_TOKENS = 40
PREFIX_CHARS = 100  # KubeAI's prefixCharLength: first user messages must differ within it


@dataclass(frozen=True)
class ChatThread:
    """One simulated user's conversation."""

    thread_id: str
    user_messages: tuple[str, ...]
    system_prompt: Optional[str] = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stateless: bool = False  # True: each turn is sent alone (no history), the control workload
    group: Optional[str] = None

    @property
    def num_turns(self) -> int:
        return len(self.user_messages)

    @property
    def user_chars(self) -> int:
        """Characters of all user messages (the 500-3000 range of the multi-turn workload)."""
        return sum(len(m) for m in self.user_messages)

    def conversation(self) -> "Conversation":
        return Conversation(self)


@dataclass
class Conversation:
    """Replay state of a thread: `next_messages()` for a turn, then `add_reply(text)`."""

    thread: ChatThread
    turn: int = 0
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.thread.system_prompt:
            self.history.append({"role": "system", "content": self.thread.system_prompt})

    @property
    def done(self) -> bool:
        return self.turn >= self.thread.num_turns

    def next_messages(self) -> list[dict]:
        """Messages to send for the next turn (appends the user message to the history)."""
        if self.done:
            raise IndexError("conversation finished")
        user = {"role": "user", "content": self.thread.user_messages[self.turn]}
        if self.thread.stateless:
            head = self.history[:1] if self.thread.system_prompt else []
            return head + [user]
        self.history.append(user)
        return list(self.history)

    def add_reply(self, text: str) -> None:
        """Record the assistant's reply and move to the next turn."""
        if not self.thread.stateless:
            self.history.append({"role": "assistant", "content": text})
        self.turn += 1


@dataclass(frozen=True)
class Workload:
    """A named list of threads plus the parameters that produced it."""

    name: str
    seed: int
    threads: tuple[ChatThread, ...]
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.threads)

    def summary(self) -> dict:
        turns = [t.num_turns for t in self.threads]
        chars = [t.user_chars for t in self.threads]
        return {
            "name": self.name, "seed": self.seed, "threads": len(self.threads),
            "requests": sum(turns), "turns_min": min(turns), "turns_max": max(turns),
            "user_chars_min": min(chars), "user_chars_max": max(chars),
            "user_chars_mean": sum(chars) / len(chars),
            "system_prompts": len({t.system_prompt for t in self.threads if t.system_prompt}),
            **self.params,
        }


# --- vocabulary ----------------------------------------------------------------------------------

TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # topic: (nouns, verbs, adjectives)
    "python": (("decorator", "generator", "dataclass", "event loop", "virtualenv", "type hint",
                "list comprehension", "context manager", "unit test", "dictionary"),
               ("refactor", "debug", "profile", "package", "annotate", "vectorize"),
               ("async", "immutable", "nested", "lazy", "thread-safe", "recursive")),
    "kubernetes": (("deployment", "pod", "ingress", "service mesh", "helm chart", "node pool",
                    "config map", "readiness probe", "operator", "namespace"),
                   ("deploy", "scale", "roll back", "schedule", "drain", "upgrade"),
                   ("stateful", "highly available", "multi-tenant", "ephemeral", "managed")),
    "cooking": (("sourdough starter", "risotto", "cast iron pan", "spice blend", "marinade",
                 "stock", "pie crust", "stir fry", "curry", "brine"),
                ("braise", "ferment", "season", "roast", "knead", "reduce"),
                ("crispy", "smoky", "gluten-free", "tangy", "slow-cooked", "vegan")),
    "travel": (("itinerary", "rail pass", "hostel", "layover", "visa", "day trip",
                "travel insurance", "carry-on", "night train", "museum pass"),
               ("book", "plan", "budget", "pack", "reroute", "explore"),
               ("affordable", "scenic", "off-season", "crowded", "remote", "family-friendly")),
    "finance": (("index fund", "emergency fund", "mortgage", "tax return", "budget sheet",
                 "retirement account", "credit score", "invoice", "dividend", "bond ladder"),
                ("save", "invest", "rebalance", "deduct", "refinance", "track"),
                ("low-cost", "tax-efficient", "variable", "long-term", "risky", "diversified")),
    "fitness": (("training plan", "deadlift", "interval run", "mobility routine", "protein intake",
                 "rest day", "heart rate zone", "kettlebell", "marathon", "warm-up"),
                ("stretch", "train", "recover", "progress", "measure", "taper"),
                ("beginner", "low-impact", "explosive", "steady", "progressive", "intense")),
    "gardening": (("raised bed", "compost pile", "tomato plant", "drip line", "seed tray",
                   "mulch layer", "fruit tree", "herb spiral", "cold frame", "rain barrel"),
                  ("prune", "transplant", "water", "fertilize", "harvest", "sow"),
                  ("shady", "drought-tolerant", "perennial", "organic", "sandy", "frost-hardy")),
    "writing": (("short story", "cover letter", "blog post", "opening chapter", "grant proposal",
                 "press release", "thesis outline", "product description", "poem", "speech"),
                ("draft", "edit", "outline", "tighten", "rewrite", "proofread"),
                ("persuasive", "concise", "formal", "playful", "technical", "emotional")),
    "databases": (("index", "query plan", "foreign key", "replica", "migration", "partition",
                   "connection pool", "materialized view", "transaction", "schema"),
                  ("optimize", "normalize", "shard", "backfill", "vacuum", "join"),
                  ("slow", "denormalized", "read-heavy", "consistent", "distributed", "legacy")),
    "music": (("chord progression", "guitar solo", "drum pattern", "mixing session", "synth patch",
               "bass line", "vocal harmony", "metronome", "setlist", "home studio"),
              ("practice", "record", "transpose", "arrange", "mix", "improvise"),
              ("minor", "syncopated", "acoustic", "lo-fi", "upbeat", "ambient")),
    "history": (("trade route", "treaty", "dynasty", "revolution", "archive", "city-state",
                 "industrial era", "empire", "manuscript", "migration wave"),
                ("compare", "trace", "explain", "date", "summarize", "interpret"),
                ("medieval", "colonial", "ancient", "overlooked", "contested", "maritime")),
    "parenting": (("bedtime routine", "screen time rule", "school lunch", "allowance", "tantrum",
                   "reading habit", "sleepover", "chore chart", "science project", "playdate"),
                  ("encourage", "limit", "negotiate", "reward", "schedule", "explain"),
                  ("picky", "shy", "energetic", "curious", "stubborn", "anxious")),
}

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi",
         "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma",
         "Viktor", "Wen", "Ximena", "Yusuf", "Zoe")
PLACES = ("Lisbon", "Nairobi", "Osaka", "Denver", "Krakow", "Lima", "Hanoi", "Oslo", "Austin",
          "Lagos", "Seoul", "Porto", "Calgary", "Tbilisi", "Perth", "Quito", "Lyon", "Pune")
RELATIONS = ("sister", "team", "manager", "landlord", "book club", "startup", "neighbor",
             "students", "grandfather", "roommate", "choir", "soccer team")

OPENERS = (
    "Hi! I'm {name} from {place} and I need help with a {adj} {noun} for my {rel}.",
    "I've been trying to {verb} my {noun} for {num} days and it keeps going wrong.",
    "Quick question about {adj} {noun}s: my {rel} in {place} says I should {verb} it first.",
    "Can you explain how to {verb} a {noun}? I have about {num} minutes and no experience.",
    "My {rel} asked me to {verb} our {noun} before {day}, and I'm not sure where to start.",
    "What's the best way to {verb} a {adj} {noun} on a budget of roughly {num} dollars?",
    "I'm {name}. Last {day} I tried to {verb} a {noun} and it turned out {adj}. Why?",
    "Help me plan: {num} people, one {adj} {noun}, and my {rel} wants it done by {day}.",
)
FOLLOW_UPS = (
    "Thanks, that helps. What about the {noun}?",
    "Could you give a concrete example with a {adj} {noun}?",
    "I tried that but the {noun} still looks {adj}. What now?",
    "How long should it take to {verb} it properly?",
    "Is there a cheaper way to {verb} the {noun}?",
    "Why does that work?",
    "Can you make that shorter?",
    "And if I only have {num} minutes?",
    "My {rel} disagrees and says to {verb} the {noun} first. Who is right?",
    "What mistakes do beginners make with a {noun}?",
    "Could you compare that with a {adj} {noun}?",
    "Ok. Next step?",
    "Please list the steps to {verb} the {noun} again, numbered.",
    "What would you change for a {adj} version?",
)
DETAILS = (
    "For context, the {noun} is {adj} and I usually {verb} it on {day}s.",
    "I read somewhere that you should never {verb} a {noun} twice in a row.",
    "We have {num} of them, and my {rel} cares mostly about cost.",
    "Last time it took {num} hours, which felt far too long.",
    "I live in {place}, if the climate or local rules matter here.",
    "The {adj} part is what confuses me the most.",
    "I'd rather not buy a new {noun} unless it's really necessary.",
    "Honestly I am a beginner, so please avoid jargon.",
    "A friend suggested a {adj} {noun}, but that seems like overkill for {num} people.",
    "The guide I followed skipped the part where you {verb} the {noun}.",
    "Budget is tight this month, maybe {num} dollars at most.",
    "It worked once on a {day}, then never again, which is the strange part.",
    "My {rel} tried the same thing in {place} and got a {adj} result.",
    "I have a {noun} already, though it is old and a bit {adj}.",
    "Ideally I would {verb} everything in one afternoon.",
    "There is also a {adj} {noun} involved, if that changes anything.",
    "I made notes: step one was to {verb}, step two to check the {noun}.",
    "People online argue about whether a {noun} should be {adj} at all.",
    "Time matters more to me than money here.",
    "Please assume I can only {verb} things on weekends.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class _TextGen:
    """Sentence generator bound to one thread's RNG and topic."""

    def __init__(self, rng: random.Random, topic: Optional[str] = None) -> None:
        self.rng = rng
        self.topic = topic or rng.choice(sorted(TOPICS))
        self.nouns, self.verbs, self.adjs = TOPICS[self.topic]
        self.name = rng.choice(NAMES)
        self.place = rng.choice(PLACES)
        self.rel = rng.choice(RELATIONS)
        self._last = ""

    def fill(self, template: str) -> str:
        r = self.rng
        return _article(template.format(noun=r.choice(self.nouns), verb=r.choice(self.verbs),
                               adj=r.choice(self.adjs), name=self.name, place=self.place,
                               rel=self.rel, num=r.randint(2, 90), day=r.choice(DAYS)))

    def opener(self) -> str:
        return self.fill(self.rng.choice(OPENERS))

    def sentence(self, first: bool = False) -> str:
        if first:
            return self.opener()
        pool = FOLLOW_UPS if self.rng.random() < 0.5 else DETAILS
        return self._pick(pool)

    def _pick(self, pool: tuple[str, ...]) -> str:
        """A filled template, never the same template twice in a row."""
        template = self.rng.choice(pool)
        if template == self._last:
            template = self.rng.choice(pool)
        self._last = template
        return self.fill(template)

    def text(self, target: int, first: bool = False) -> str:
        """Sentences up to about `target` characters, cut at a word boundary (never longer)."""
        if target < 60 and not first:
            for _ in range(8):  # short turns: prefer a whole short follow-up to a cut one
                s = self.sentence()
                if len(s) <= target:
                    return s
        parts = [self.sentence(first)]
        while sum(len(p) + 1 for p in parts) < target:
            parts.append(self._pick(DETAILS if first else FOLLOW_UPS + DETAILS))
        return _cut(" ".join(parts), target)


_A_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _article(text: str) -> str:
    """'a event loop' -> 'an event loop'."""
    return _A_VOWEL.sub(r"\1n ", text)


def _cut(text: str, limit: int) -> str:
    """Truncate to at most `limit` chars: at a sentence end if one is past the middle, else at a
    word boundary, else hard."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if end + 1 > limit // 2:
        return text[:end + 1]
    cut = head.rfind(" ")
    return text[:cut] if cut > limit // 2 else text[:limit]


def _split_lengths(rng: random.Random, total: int, parts: int, floor: int) -> list[int]:
    """Split `total` characters into `parts` random lengths, each at least `floor`."""
    weights = [rng.expovariate(1.0) + 0.2 for _ in range(parts)]
    spare = max(0, total - floor * parts)
    scale = spare / sum(weights)
    lengths = [floor + int(w * scale) for w in weights]
    lengths[0] += total - sum(lengths)
    return lengths


def _thread_rng(seed: int, kind: str, index: int) -> random.Random:
    # Seeding with a str is deterministic (SHA-512 based), unlike hash().
    return random.Random(f"{seed}:{kind}:{index}")


def _unique_first(make: Callable[[], tuple[str, ...]], seen: set[str],
                  attempts: int = 50) -> tuple[str, ...]:
    """Regenerate until the first message's routing prefix is new (deterministic: same RNG)."""
    for _ in range(attempts):
        msgs = make()
        key = msgs[0][:PREFIX_CHARS]
        if key not in seen:
            seen.add(key)
            return msgs
    raise RuntimeError("could not generate a unique first message")


# --- generators ----------------------------------------------------------------------------------

def multi_turn_threads(n: int, seed: int = 0, *, messages: tuple[int, int] = MULTI_TURN_MESSAGES,
                       chars: tuple[int, int] = MULTI_TURN_CHARS,
                       max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """`n` conversations of `messages` user turns totalling `chars` characters each."""
    seen: set[str] = set()
    threads = []
    for i in range(n):
        rng = _thread_rng(seed, "multi", i)

        def make(rng: random.Random = rng) -> tuple[str, ...]:
            gen = _TextGen(rng)
            k = rng.randint(*messages)
            total = rng.randint(*chars)
            floor = max(1, min(12, total // k))
            lengths = _split_lengths(rng, total, k, floor)
            msgs = [gen.text(length, first=(j == 0)) for j, length in enumerate(lengths)]
            return _fit_total(gen, msgs, chars)

        threads.append(ChatThread(f"mt-{seed}-{i}", _unique_first(make, seen),
                                  max_tokens=max_tokens))
    return Workload("multi-turn", seed, tuple(threads),
                    {"messages": list(messages), "chars": list(chars), "max_tokens": max_tokens})


def _fit_total(gen: _TextGen, msgs: list[str], chars: tuple[int, int]) -> tuple[str, ...]:
    """Nudge message texts so the thread's total lands inside `chars` (cuts only shorten)."""
    lo, hi = chars
    while sum(map(len, msgs)) < lo:
        room = hi - sum(map(len, msgs)) - 1
        msgs[-1] = (msgs[-1] + " " + _cut(gen.sentence(), room)).strip()
    while sum(map(len, msgs)) > hi:
        j = max(range(len(msgs)), key=lambda x: len(msgs[x]))
        msgs[j] = _cut(msgs[j], len(msgs[j]) - (sum(map(len, msgs)) - hi))
    return tuple(m if m else "Ok?" for m in msgs)


def shared_prefix_threads(groups: int, users_per_group: int, seed: int = 0, *,
                          system_chars: tuple[int, int] = (2000, 6000),
                          question_chars: tuple[int, int] = (80, 400),
                          questions: tuple[int, int] = (1, 3),
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """Groups of users sharing one long system prompt, each with their own questions."""
    threads = []
    seen: set[str] = set()
    for g in range(groups):
        grng = _thread_rng(seed, "shared-system", g)
        system = _system_prompt(grng, grng.randint(*system_chars), g)
        for u in range(users_per_group):
            rng = _thread_rng(seed, f"shared-user-{g}", u)

            def make(rng: random.Random = rng) -> tuple[str, ...]:
                gen = _TextGen(rng)
                k = rng.randint(*questions)
                return tuple(gen.text(rng.randint(*question_chars), first=(j == 0))
                             for j in range(k))

            threads.append(ChatThread(f"sp-{seed}-{g}-{u}", _unique_first(make, seen),
                                      system_prompt=system, max_tokens=max_tokens,
                                      group=f"group-{g}"))
    return Workload("shared-prefix", seed, tuple(threads),
                    {"groups": groups, "users_per_group": users_per_group,
                     "system_chars": list(system_chars), "max_tokens": max_tokens})


def _system_prompt(rng: random.Random, target: int, group: int) -> str:
    """A long assistant brief (product rules, tone, facts) of about `target` characters."""
    gen = _TextGen(rng)
    company = f"{rng.choice(PLACES)} {rng.choice(('Labs', 'Outfitters', 'Health', 'Bank'))}"
    parts = [f"You are the assistant of {company} (desk {group}), helping customers with "
             f"{gen.topic}. Follow these rules carefully."]
    rule = 1
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(f"Rule {rule}: " + gen.fill(rng.choice(DETAILS + FOLLOW_UPS)))
        rule += 1
    return _cut(" ".join(parts), target)


SYSTEM_PROMPT_CHARS = (8000, 12000)  # ~2,000-3,000 tokens in the simulator's tokenizer
SYSTEM_PROMPT_QUESTION_CHARS = (60, 300)


def system_prompt_threads(n: int, seed: int = 0, *, prompts: int = 24,
                          system_chars: tuple[int, int] = SYSTEM_PROMPT_CHARS,
                          question_chars: tuple[int, int] = SYSTEM_PROMPT_QUESTION_CHARS,
                          questions: tuple[int, int] = (1, 1),
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """`n` users of `prompts` applications: user i belongs to application i % prompts, whose long
    system prompt opens every request; each question is unique and sent alone (`stateless`).

    One question per user by default: a closed-loop slot then moves to another application after
    every request. With several questions per user, a slot would stay on one application, and
    LeastLoad, which sends a slot's next request back to the replica its last one just left,
    would gain an affinity no real population of users gives it.

    Why several applications rather than one: a single shared prompt fits every replica's cache
    after one miss each, whatever the routing, so routing could not matter. Several prompts
    together outgrow one replica's cache while each replica's share fits, which is where a
    conversation-prefix key pays (the same relation the multi-turn study rests on).
    """
    systems = [_system_prompt(_thread_rng(seed, "system-prompt", g),
                              _thread_rng(seed, "system-size", g).randint(*system_chars), g)
               for g in range(prompts)]
    seen: set[str] = set()
    threads = []
    for i in range(n):
        rng = _thread_rng(seed, "system-user", i)
        gen = _TextGen(rng)
        msgs = tuple(_unique_first(lambda: (gen.text(rng.randint(*question_chars), first=True),),
                                   seen)[0]
                     for _ in range(rng.randint(*questions)))
        threads.append(ChatThread(f"sy-{seed}-{i}", msgs, system_prompt=systems[i % prompts],
                                  max_tokens=max_tokens, stateless=True,
                                  group=f"app-{i % prompts}"))
    return Workload("system-prompt", seed, tuple(threads),
                    {"prompts": prompts, "system_chars": list(system_chars),
                     "question_chars": list(question_chars), "max_tokens": max_tokens})


DOCUMENT_CHARS = (6000, 12000)  # ~1,500-3,000 tokens each in the simulator's tokenizer


def document_threads(n: int, seed: int = 0, *, documents: int = 32,
                     doc_chars: tuple[int, int] = DOCUMENT_CHARS, zipf_s: float = 1.1,
                     questions: tuple[int, int] = (1, 4),
                     question_chars: tuple[int, int] = (60, 300),
                     max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """`n` users reading `documents` long documents, chosen by Zipf popularity (exponent
    `zipf_s`: the top document draws ~1/4 of the users at 32 documents): the first message
    is the whole document followed by a question, then `questions` - 1 follow-ups in the same
    conversation. Hot documents outgrow one replica's share of the load, so where the
    overflow goes (a replica that already holds the document, or any) decides their TTFT."""
    docs = [_document(_thread_rng(seed, "document", d),
                      _thread_rng(seed, "document-size", d).randint(*doc_chars), d)
            for d in range(documents)]
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(documents)]
    total = sum(weights)
    cumulative = list(itertools.accumulate(w / total for w in weights))
    threads = []
    for i in range(n):
        rng = _thread_rng(seed, "document-user", i)
        gen = _TextGen(rng)
        d = min(bisect.bisect_left(cumulative, rng.random()), documents - 1)
        asks = [gen.text(rng.randint(*question_chars), first=(j == 0))
                for j in range(rng.randint(*questions))]
        first = f"Read this document, then answer my question.\n\n{docs[d]}\n\nQuestion: {asks[0]}"
        threads.append(ChatThread(f"doc-{seed}-{i}", (first, *asks[1:]), max_tokens=max_tokens,
                                  group=f"doc-{d}"))
    return Workload("documents", seed, tuple(threads),
                    {"documents": documents, "doc_chars": list(doc_chars), "zipf_s": zipf_s,
                     "questions": list(questions), "max_tokens": max_tokens})


def _document(rng: random.Random, target: int, index: int) -> str:
    """A report of about `target` characters, titled so no two documents share a block."""
    gen = _TextGen(rng)
    parts = [f"Report {index}: {gen.topic} in {gen.place}."]
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(gen.fill(rng.choice(DETAILS + FOLLOW_UPS)))
    return _cut(" ".join(parts), target)


AGENT_TOOLS_CHARS = (2000, 3000)
AGENT_OBSERVATION_CHARS = (200, 600)


def agentic_threads(n: int, seed: int = 0, *, families: int = 8,
                    tools_chars: tuple[int, int] = AGENT_TOOLS_CHARS,
                    steps: tuple[int, int] = (3, 8),
                    observation_chars: tuple[int, int] = AGENT_OBSERVATION_CHARS,
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """`n` agent runs: each opens with its family's tool definitions (a system prompt shared by
    the `families` kinds of agent) and a unique task, then loops `steps` times, each step
    sending the whole context grown by the model's last action and the tool's observation."""
    tools = [_tool_definitions(_thread_rng(seed, "agent-tools", f),
                               _thread_rng(seed, "agent-tools-size", f).randint(*tools_chars), f)
             for f in range(families)]
    seen: set[str] = set()
    threads = []
    for i in range(n):
        rng = _thread_rng(seed, "agent", i)

        def make(rng: random.Random = rng, i: int = i) -> tuple[str, ...]:
            gen = _TextGen(rng)
            task = f"Task {i}: " + gen.text(rng.randint(120, 300), first=True)
            observations = tuple(
                f"Observation {k + 1}: " + gen.text(rng.randint(*observation_chars))
                for k in range(rng.randint(*steps)))
            return (task, *observations)

        threads.append(ChatThread(f"agent-{seed}-{i}", _unique_first(make, seen),
                                  system_prompt=tools[i % families], max_tokens=max_tokens,
                                  group=f"family-{i % families}"))
    return Workload("agentic", seed, tuple(threads),
                    {"families": families, "tools_chars": list(tools_chars),
                     "steps": list(steps), "observation_chars": list(observation_chars),
                     "max_tokens": max_tokens})


def _tool_definitions(rng: random.Random, target: int, family: int) -> str:
    gen = _TextGen(rng)
    parts = [f"You are agent family {family}: you solve tasks about {gen.topic} by calling "
             "tools. Answer with one tool call per step. Tools:"]
    tool = 1
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(f"tool_{tool}(query): " + gen.fill(rng.choice(DETAILS)))
        tool += 1
    return _cut(" ".join(parts), target)


def unique_prompt_threads(n: int, seed: int = 0, *,
                          messages: tuple[int, int] = MULTI_TURN_MESSAGES,
                          prompt_chars: tuple[int, int] = MULTI_TURN_CHARS,
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> Workload:
    """The control: every turn is an independent unique prompt of `prompt_chars` characters
    (each about the size of a late multi-turn prompt), with no history and no shared prefix."""
    seen: set[str] = set()
    threads = []
    for i in range(n):
        rng = _thread_rng(seed, "unique", i)

        def make(rng: random.Random = rng) -> tuple[str, ...]:
            gen = _TextGen(rng)
            k = rng.randint(*messages)
            return tuple(_tagged(gen, rng, prompt_chars, i, j) for j in range(k))

        threads.append(ChatThread(f"up-{seed}-{i}", _unique_first(make, seen),
                                  max_tokens=max_tokens, stateless=True))
    return Workload("unique-prompts", seed, tuple(threads),
                    {"messages": list(messages), "prompt_chars": list(prompt_chars),
                     "max_tokens": max_tokens})


def _tagged(gen: _TextGen, rng: random.Random, chars: tuple[int, int], i: int, j: int) -> str:
    """A unique prompt: an id up front guarantees no two requests share a 16-token block."""
    tag = f"[ticket {i}-{j}] "
    lo, hi = chars
    text = tag + gen.text(rng.randint(lo, hi) - len(tag), first=True)
    while len(text) < lo:  # sentence-end cuts can undershoot; top up within the range
        text += " " + _cut(gen.sentence(), hi - len(text) - 1)
    return text


WORKLOADS = {
    "multi-turn": multi_turn_threads,
    "system-prompt": system_prompt_threads,
    "documents": document_threads,
    "agentic": agentic_threads,
    "unique-prompts": unique_prompt_threads,
}


def make_workload(name: str, n_threads: int, seed: int = 0, **kwargs: object) -> Workload:
    """Build a workload by name; `shared-prefix` splits `n_threads` into groups of 16 users."""
    if name == "shared-prefix":
        per = int(kwargs.pop("users_per_group", 16))  # type: ignore[arg-type]
        return shared_prefix_threads(max(1, -(-n_threads // per)), per, seed,
                                     **kwargs)  # type: ignore[arg-type]
    try:
        fn = WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: multi-turn, shared-prefix, "
                       f"{', '.join(n for n in WORKLOADS if n != 'multi-turn')}") from None
    return fn(n_threads, seed, **kwargs)  # type: ignore[operator]
