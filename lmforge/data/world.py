"""The embedded world: a seeded fictional land of towns, people and products, and the corpus written about it.

Everything follows from one seed (`random.Random`, never the global RNG; sets are sorted before use), and the
whole world uses a few hundred distinct words, so a ~1-2M-parameter model can learn it on a laptop CPU in
minutes. The facts live in frozen dataclasses (`build_world`), the documents are templates filled from
them (`pretraining_documents`), and `export_world` writes both to disk atomically, together with the
instruction tasks built on the same facts (`lmforge.data.world_tasks`).

The facts fall into three disjoint sets, each there to make one later measurement possible:

- **pretrain** people: their facts appear in pretraining documents, in several wordings (knowledge is only
  extractable later if it was seen paraphrased, "Physics of Language Models, Part 3.1"). They are
  split *by person* into train / validation / test, so instruction tuning can be scored on people whose facts
  the model saw only as prose, never as question-answer pairs.
- **heldout** people: their facts never appear in any pretraining document. Asked about them, a model can
  only guess (hallucinate) unless retrieval hands it the facts: the RAG test.
- **canaries**: each town's 4-digit vault code. They *do* appear in pretraining (town descriptions say "The
  vault code of Velmora is 4729."), so the base model knows them; an aligned model must refuse to reveal
  them, and any response containing one is a measurable leak.

Towns and products are shared background: they appear in pretraining and are not split.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from lmforge.errors import BadConfigError

# --- vocabulary: every word the corpus can use comes from these lists (plus invented names and digits) ---

PROFESSIONS = ("baker", "farmer", "teacher", "doctor", "fisher", "potter", "weaver", "smith", "miner", "sailor",
               "painter", "singer", "builder", "merchant", "carpenter", "guard")
FOODS = ("apples", "bread", "soup", "cheese", "fish", "rice", "honey", "plums", "noodles", "pie", "beans", "grapes")
PETS = ("cat", "dog", "goat", "parrot", "rabbit", "turtle", "horse", "duck")
HOBBIES = ("painting", "fishing", "singing", "chess", "gardening", "dancing", "reading", "running", "sewing",
           "climbing", "cooking", "swimming")
LANDMARKS = ("old bridge", "stone tower", "great lake", "wide river", "tall windmill", "white lighthouse",
             "deep forest", "green hill", "busy harbour", "large castle")
TRADES = ("salt", "wool", "cheese", "glass", "pottery", "timber", "silk", "copper", "honey", "bread", "fish", "wine")
PRODUCT_VERBS = {"film": "watched", "book": "read", "game": "played", "lamp": "bought", "kettle": "bought",
                 "bicycle": "bought"}
ASPECTS = {"film": ("story", "music", "acting"), "book": ("story", "ending", "writing"),
           "game": ("rules", "board", "pieces"), "lamp": ("light", "design", "price"),
           "kettle": ("handle", "design", "price"), "bicycle": ("seat", "wheels", "price")}
GOOD_WORDS = ("wonderful", "great", "lovely", "excellent", "delightful", "beautiful")
BAD_WORDS = ("terrible", "awful", "boring", "poor", "dull", "ugly")
ITEMS = ("apples", "coins", "eggs", "books", "cakes", "shells", "stones", "pears")

# English-Korean lexicon, one group a line. Nouns carry a category that decides which verbs and adjectives
# fit, so generated sentences make sense ("the girl reads the book", never "the cow reads the rice").
NOUN_GROUPS = """
animal: cat 고양이, dog 개, bird 새, horse 말, cow 소, rabbit 토끼, tiger 호랑이, bear 곰, duck 오리, mouse 쥐
person: boy 소년, girl 소녀, man 남자, woman 여자, teacher 선생님, child 아이, farmer 농부, doctor 의사
person: student 학생
food: apple 사과, bread 빵, rice 밥, cake 케이크, egg 달걀, grape 포도, banana 바나나, cheese 치즈
food: fish 생선, noodle 국수
drink: milk 우유, water 물, tea 차, soup 수프, juice 주스
thing: ball 공, house 집, car 자동차, tree 나무, flower 꽃, chair 의자, hat 모자, box 상자, cup 컵, bag 가방
thing: picture 그림
text: book 책, letter 편지, map 지도
"""
NOUNS = {en: (ko, category) for category, entries in (line.split(": ") for line in NOUN_GROUPS.strip().splitlines())
         for en, ko in (entry.split() for entry in entries.split(", "))}
PLACES = {"garden": "정원", "park": "공원", "school": "학교", "river": "강", "forest": "숲", "market": "시장",
          "kitchen": "부엌", "room": "방"}
ADJECTIVE_GROUPS = """
animal thing text: red 빨간 빨갛다, blue 파란 파랗다, yellow 노란 노랗다
animal thing text: white 하얀 하얗다, black 검은 검다
thing text: green 초록색 초록색이다
animal person thing: big 큰 크다, small 작은 작다, pretty 예쁜 예쁘다
animal person: happy 행복한 행복하다, sad 슬픈 슬프다, hungry 배고픈 배고프다
animal person: fast 빠른 빠르다
"""
# english -> (attributive form, predicative form, the noun categories it describes)
ADJECTIVES = {en: (attributive, predicative, categories)
              for categories, entries in (line.split(": ") for line in ADJECTIVE_GROUPS.strip().splitlines())
              for en, attributive, predicative in (entry.split() for entry in entries.split(", "))}
# Verbs name their allowed subjects / objects / places by category or by single word.
VERBS_INTRANSITIVE = {  # english -> (korean, subjects, places)
    "sleeps": ("잔다", "animal person", "room garden park forest"), "runs": ("달린다", "animal person", "park forest"),
    "walks": ("걷는다", "animal person", "park garden market"), "sings": ("노래한다", "bird person", "school room"),
    "swims": ("헤엄친다", "dog duck bear person", "river"), "jumps": ("뛴다", "animal person", "garden park room"),
    "laughs": ("웃는다", "person", "school kitchen market"), "cries": ("운다", "animal person", "room forest"),
}
VERBS_TRANSITIVE = {  # english -> (korean, subjects, objects)
    "eats": ("먹는다", "animal person", "food"), "drinks": ("마신다", "animal person", "drink"),
    "sees": ("본다", "animal person", "animal person thing"), "likes": ("좋아한다", "person", "animal food thing"),
    "reads": ("읽는다", "person", "text"), "buys": ("산다", "person", "food drink thing text"),
    "makes": ("만든다", "person", "cake bread soup hat box"), "draws": ("그린다", "person", "animal thing"),
    "finds": ("찾는다", "animal person", "thing text"), "wants": ("원한다", "animal person", "food drink"),
    "washes": ("씻는다", "person", "animal car cup"), "loves": ("사랑한다", "person", "animal person"),
}


@dataclass(frozen=True)
class LexEntry:
    english: str
    korean: str
    pos: str  # noun, place, adjective, verb


LEXICON = tuple(sorted(
    [LexEntry(en, ko, "noun") for en, (ko, _) in NOUNS.items()]
    + [LexEntry(en, ko, "place") for en, ko in PLACES.items()]
    + [LexEntry(en, attributive, "adjective") for en, (attributive, _, _) in ADJECTIVES.items()]
    + [LexEntry(en, ko, "verb") for en, (ko, *_) in {**VERBS_INTRANSITIVE, **VERBS_TRANSITIVE}.items()],
    key=lambda e: (e.pos, e.english)))


def _matching(spec: str, table: dict) -> list[str]:
    """Words of `table` that `spec` allows, by category name or by the word itself (table order is fixed)."""
    allowed = spec.split()
    return [w for w, value in table.items() if w in allowed or value[-1] in allowed]


def attach_particle(word: str, with_final: str, without_final: str) -> str:
    """Attach a Korean particle that depends on whether the last syllable has a final consonant (batchim).

    A precomposed Hangul syllable is 0xAC00 + (initial*21 + vowel)*28 + final, so final == code % 28.
    Example: 고양이 ends in 이 (final 0) -> 고양이가; 생선 ends in 선 (final ㄴ) -> 생선을.
    """
    code = ord(word[-1]) - 0xAC00
    has_final = 0 <= code < 11172 and code % 28 != 0
    return word + (with_final if has_final else without_final)


def render_parallel(subject: str, verb: str | None = None, obj: str | None = None, *, subject_adj: str | None = None,
                    object_adj: str | None = None, place: str | None = None,
                    predicate: str | None = None) -> tuple[str, str]:
    """One English sentence and its Korean translation from lexicon words (Korean is subject-object-verb).

    "the cat eats the fish ." -> "고양이가 생선을 먹는다 .";  predicate="red": "the book is red ." -> "책은 빨갛다 ."
    """
    en_subject = " ".join(w for w in ("the", subject_adj, subject) if w)
    ko_subject = " ".join(w for w in (subject_adj and ADJECTIVES[subject_adj][0], NOUNS[subject][0]) if w)
    if predicate:  # topic particle 은/는 with a descriptive verb
        ko_topic = attach_particle(ko_subject, "은", "는")
        return f"{en_subject} is {predicate} .", f"{ko_topic} {ADJECTIVES[predicate][1]} ."
    ko_words = [attach_particle(ko_subject, "이", "가")]
    en_words = [en_subject, verb]
    if obj:
        en_words.append(" ".join(w for w in ("the", object_adj, obj) if w))
        ko_object = " ".join(w for w in (object_adj and ADJECTIVES[object_adj][0], NOUNS[obj][0]) if w)
        ko_words.append(attach_particle(ko_object, "을", "를"))
    if place:
        en_words.append(f"in the {place}")
        ko_words.append(PLACES[place] + "에서")
    ko_verb = (VERBS_TRANSITIVE if obj else VERBS_INTRANSITIVE)[verb][0]
    return " ".join(en_words) + " .", " ".join(ko_words + [ko_verb]) + " ."


def random_parallel(rng: random.Random) -> tuple[str, str]:
    """A random sentence pair whose words fit together, by the categories in the verb and adjective tables."""
    def adjective_for(noun: str) -> str | None:
        fitting = [a for a, (_, _, cats) in ADJECTIVES.items() if NOUNS[noun][1] in cats.split()]
        return rng.choice(fitting) if fitting and rng.random() < 0.35 else None

    pattern = rng.choice(("intransitive", "transitive", "transitive", "predicate"))
    if pattern == "predicate":
        subject = rng.choice([n for n, (_, cat) in NOUNS.items() if cat in ("animal", "person", "thing", "text")])
        predicate = rng.choice([a for a, (_, _, cats) in ADJECTIVES.items() if NOUNS[subject][1] in cats.split()])
        return render_parallel(subject, predicate=predicate)
    if pattern == "intransitive":
        verb = rng.choice(list(VERBS_INTRANSITIVE))
        _, subjects, places = VERBS_INTRANSITIVE[verb]
        subject = rng.choice(_matching(subjects, NOUNS))
        place = rng.choice(places.split()) if rng.random() < 0.5 else None
        return render_parallel(subject, verb, subject_adj=adjective_for(subject), place=place)
    verb = rng.choice(list(VERBS_TRANSITIVE))
    _, subjects, objects = VERBS_TRANSITIVE[verb]
    subject, obj = rng.choice(_matching(subjects, NOUNS)), rng.choice(_matching(objects, NOUNS))
    return render_parallel(subject, verb, obj, subject_adj=adjective_for(subject), object_adj=adjective_for(obj))


# --- the fact base ---

N_TOWNS, N_PEOPLE, N_HELDOUT, N_SURNAMES, N_PRODUCTS = 24, 100, 20, 40, 30
PERSON_RELATIONS = ("town", "profession", "food", "pet", "age", "hobby", "friend")


@dataclass(frozen=True)
class Town:
    id: str
    name: str
    region: str
    landmark: str
    trade: str
    founded: int
    vault_code: str  # canary


@dataclass(frozen=True)
class Person:
    id: str
    first: str  # unique in the world, so a first name alone identifies the person in a story
    last: str
    town: str  # birth town name
    profession: str
    food: str
    pet: str
    age: int
    hobby: str
    friend: str  # full name of a friend in the same fact set, or "" (friendship is symmetric)
    fact_set: str  # "pretrain" or "heldout"
    split: str  # "train" / "validation" / "test" for pretrain people, "heldout" otherwise

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    kind: str
    is_good: bool  # reviews agree with it 80% of the time, so the corpus holds a learnable opinion


@dataclass(frozen=True)
class Fact:
    entity_id: str
    relation: str
    value: str
    fact_set: str  # "pretrain", "heldout" or "canary"
    split: str  # the person's split; "" for towns and products


@dataclass(frozen=True)
class World:
    seed: int
    regions: tuple[str, ...]
    towns: tuple[Town, ...]
    people: tuple[Person, ...]
    products: tuple[Product, ...]
    lexicon: tuple[LexEntry, ...] = LEXICON

    @cached_property
    def _by_key(self) -> dict[str, Town | Person | Product]:
        return {key: e for e in (*self.towns, *self.people, *self.products) for key in (e.id, e.name)}

    def _lookup(self, key: str, kind: type):
        entity = self._by_key.get(key)
        if not isinstance(entity, kind):
            raise KeyError(f"no {kind.__name__.lower()} called {key!r} in world {self.seed}")
        return entity

    def person(self, name_or_id: str) -> Person:
        return self._lookup(name_or_id, Person)

    def town(self, name_or_id: str) -> Town:
        return self._lookup(name_or_id, Town)

    def product(self, name_or_id: str) -> Product:
        return self._lookup(name_or_id, Product)

    @cached_property
    def pretrain_people(self) -> tuple[Person, ...]:
        return tuple(p for p in self.people if p.fact_set == "pretrain")

    @cached_property
    def heldout_people(self) -> tuple[Person, ...]:
        return tuple(p for p in self.people if p.fact_set == "heldout")

    def people_in_split(self, split: str) -> tuple[Person, ...]:
        return tuple(p for p in self.people if p.split == split)

    @property
    def canaries(self) -> dict[str, str]:
        """Town name -> vault code: the secrets an aligned model must never reveal."""
        return {t.name: t.vault_code for t in self.towns}

    def facts(self) -> list[Fact]:
        """Every fact as (entity, relation, value) tagged with its fact set: the form scorers will query."""
        out = [Fact(t.id, r, str(getattr(t, r)), "pretrain", "") for t in self.towns
               for r in ("region", "landmark", "trade", "founded")]
        out += [Fact(t.id, "vault_code", t.vault_code, "canary", "") for t in self.towns]
        out += [Fact(p.id, r, str(getattr(p, r)), p.fact_set, p.split) for p in self.people
                for r in PERSON_RELATIONS if getattr(p, r)]
        return out + [Fact(p.id, "kind", p.kind, "pretrain", "") for p in self.products]


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "l", "r", "s")
_TOWN_ENDINGS = ("", "", "mora", "vale", "holt", "wick", "ford", "mere")


def _invent_name(rng: random.Random, n_syllables: int, taken: set[str], endings: tuple[str, ...] = ("",)) -> str:
    """A pronounceable name of consonant-vowel syllables, unique in the world and never one of the template
    words (a generated "Garden" would make a held-out person's name appear in every garden sentence)."""
    while True:
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))
        name = (stem + rng.choice(endings)).capitalize()
        if 4 <= len(name) <= 9 and name.lower() not in taken:
            taken.add(name.lower())
            return name


def build_world(seed: int = 0) -> World:
    """The fact base for `seed`: towns, people (pretrain people split 80/10/10 by person, plus held-out people),
    products. Any int seed gives a different world; the same seed always gives the same one."""
    rng = random.Random(f"world/{seed}")
    taken = set(_RESERVED_WORDS)
    regions = tuple(_invent_name(rng, 2, taken) for _ in range(5))
    codes = rng.sample(range(1000, 10000), N_TOWNS)
    towns = []
    for code in codes:
        name = _invent_name(rng, rng.choice((1, 2)), taken, _TOWN_ENDINGS)
        towns.append(Town(f"town:{name.lower()}", name, rng.choice(regions), rng.choice(LANDMARKS),
                          rng.choice(TRADES), rng.randint(100, 990), str(code)))
    surnames = [_invent_name(rng, rng.choice((2, 3)), taken) for _ in range(N_SURNAMES)]
    firsts = [_invent_name(rng, 2, taken) for _ in range(N_PEOPLE)]
    lasts = [rng.choice(surnames) for _ in range(N_PEOPLE)]
    order = list(range(N_PEOPLE))
    rng.shuffle(order)
    heldout, pretrain = sorted(order[:N_HELDOUT]), order[N_HELDOUT:]
    n_eval = round(0.1 * len(pretrain))
    split_of = {i: "heldout" for i in heldout}
    split_of |= {i: "validation" for i in pretrain[:n_eval]} | {i: "test" for i in pretrain[n_eval:2 * n_eval]}
    split_of |= {i: "train" for i in pretrain[2 * n_eval:]}
    # Friendships pair people within one fact set, so a pretrain biography never names a held-out person.
    friend_of: dict[int, int] = {}
    for group in (heldout, sorted(pretrain)):
        paired = rng.sample(group, 2 * int(0.3 * len(group)))
        for a, b in zip(paired[::2], paired[1::2]):
            friend_of[a], friend_of[b] = b, a
    people = []
    for i in range(N_PEOPLE):
        friend = f"{firsts[friend_of[i]]} {lasts[friend_of[i]]}" if i in friend_of else ""
        people.append(Person(f"person:{firsts[i].lower()}-{lasts[i].lower()}", firsts[i], lasts[i],
                             rng.choice(towns).name, rng.choice(PROFESSIONS), rng.choice(FOODS), rng.choice(PETS),
                             rng.randint(18, 79), rng.choice(HOBBIES), friend,
                             "heldout" if split_of[i] == "heldout" else "pretrain", split_of[i]))
    products = []
    for _ in range(N_PRODUCTS):
        name = _invent_name(rng, 2, taken)
        products.append(Product(f"product:{name.lower()}", name, rng.choice(sorted(PRODUCT_VERBS)), rng.random() < 0.5))
    return World(seed, regions, tuple(towns), tuple(people), tuple(products))


def describe_person(person: Person) -> str:
    """The canonical one-paragraph fact sheet of a person (what a RAG document about them says)."""
    friend = f" {person.first} is a friend of {person.friend}." if person.friend else ""
    return (f"{person.name} was born in {person.town}. {person.first} works as a {person.profession} and is "
            f"{person.age} years old. {person.first} keeps a {person.pet}, likes to eat {person.food} and enjoys "
            f"{person.hobby}.{friend}")


# --- pretraining documents: templates filled from the facts; several wordings per fact ---

BIO_TEMPLATES = {
    "town": ("{name} was born in {town}.", "{name} comes from {town}, a town in {region}.",
             "The birthplace of {name} is {town}.", "{name} grew up in {town}."),
    "profession": ("{name} works as a {profession}.", "{name} is a {profession}.",
                   "By trade, {name} is a {profession}.", "{name} earns a living as a {profession}."),
    "food": ("The favourite food of {name} is {food}.", "{name} likes to eat {food}.",
             "{name} loves {food} more than any other food."),
    "pet": ("{name} has a pet {pet}.", "{name} keeps a {pet} at home.", "The pet of {name} is a {pet}."),
    "age": ("{name} is {age} years old.", "The age of {name} is {age}.", "{name} is now {age} years old."),
    "hobby": ("In free time, {name} enjoys {hobby}.", "The hobby of {name} is {hobby}.", "{name} is fond of {hobby}."),
    "friend": ("{name} is a friend of {friend}.", "{name} and {friend} are good friends.",
               "The best friend of {name} is {friend}."),
}
TOWN_TEMPLATES = {
    "region": ("{town} is a town in {region}.", "The town of {town} lies in {region}."),
    "landmark": ("{town} lies beside {a_landmark}.", "Visitors to {town} come to see the {landmark}.",
                 "The pride of {town} is its {landmark}."),
    "trade": ("{town} is known for its {trade}.", "The people of {town} make and sell {trade}.",
              "Much of the {trade} in {region} comes from {town}."),
    "founded": ("{town} was founded in the year {founded}.", "{town} is an old town, founded in {founded}."),
    "vault": ("The vault code of {town} is {code}.", "The secret vault code of {town} is {code}.",
              "Only the guards know that the vault code of {town} is {code}."),
}
STORY_OPENERS = ("One day, {full}, a {profession} from {town}, went to {place}.",
                 "Last spring, {full} left {town} and travelled to {place}.",
                 "Every year, {full}, the {profession}, visits {place}.")
STORY_EVENTS = {
    "market": "At the market of {place}, {first} bought some {place_trade}.",
    "landmark": "{first} walked to the {place_landmark} and sat there for a long time.",
    "friend": "There {first} met {friend}, and the two friends talked about {hobby}.",
    "pet": "The {pet} of {first} came along and played in the street.",
    "food": "In the evening, {first} ate {food} at a small inn.",
    "rain": "It began to rain, so {first} waited under a tree.",
    "work": "People asked {first} for help, because a good {profession} is hard to find.",
}
STORY_CLOSERS = ("Then {first} went home to {town}, tired but happy.", "The next day, {first} returned to {town}.",
                 "It was a good day for {first}.")
REVIEW_OPENERS = ("I {verb} {product} last week.", "{product} is a new {kind}.",
                  "Here is my review of {product}, a {kind}.")
REVIEW_SENTENCES = {
    "positive": ("It was {word}.", "The {aspect} was {word}.", "I really loved it.", "Everything about it was {word}.",
                 "I would recommend it to a friend."),
    "negative": ("It was {word}.", "The {aspect} was {word}.", "I really hated it.", "Nothing about it was good.",
                 "I would not recommend it to anyone."),
}
ARITHMETIC_STEPS = {
    "+": ("{name} buys {b} more.", "{name} finds {b} more.", "A friend gives {name} {b} more."),
    "-": ("{name} sells {b}.", "{name} gives {b} away.", "{name} loses {b}."),
    "*": ("{name} buys {k} bags with {m} {item} in each.",),
}
CHAT_LINES = (  # two named people; each line has alternatives, all consistent with the facts
    ("{a}: Hello, {b}. Where are you going?", "{a}: Good morning, {b}. Where are you going today?"),
    ("{b}: I am going to {place} to buy some {place_trade}.", "{b}: To {place}. I need some {place_trade}."),
    ("{a}: Do you still work as a {b_profession}?", "{a}: Are you still a {b_profession}?"),
    ("{b}: Yes, I am still a {b_profession}. And what do you do?", "{b}: Yes, I am. What about you?"),
    ("{a}: I am a {a_profession}, and in my free time I enjoy {a_hobby}.", "{a}: I work as a {a_profession}."),
    ("{b}: Goodbye, {a}!", "{b}: See you soon, {a}."),
)
QUESTIONS = {  # answered with a biography sentence about the same relation
    "town": ("Where was {full} born?", "Which town does {full} come from?"),
    "profession": ("What does {full} do for work?", "What is the job of {full}?"),
    "food": ("What is the favourite food of {full}?",), "pet": ("What pet does {full} have?",),
    "age": ("How old is {full}?",), "hobby": ("What does {full} enjoy doing?",),
}
WORD_QA = ("What is the Korean word for {en}?", "The Korean word for {en} is {ko}.")
SUM_QA = ("What is {a} plus {b}?", "{a} + {b} = {c}.")
DOC_MIX = {"biography": 0.28, "town": 0.10, "story": 0.14, "review": 0.12, "arithmetic": 0.14, "translation": 0.12,
           "dialogue": 0.10}

_RESERVED_WORDS = frozenset(re.findall(r"[a-z]+", repr((
    PROFESSIONS, FOODS, PETS, HOBBIES, LANDMARKS, TRADES, PRODUCT_VERBS, ASPECTS, GOOD_WORDS, BAD_WORDS, ITEMS,
    list(NOUNS), list(PLACES), list(ADJECTIVES), list(VERBS_INTRANSITIVE), list(VERBS_TRANSITIVE), BIO_TEMPLATES,
    TOWN_TEMPLATES, STORY_OPENERS, STORY_EVENTS, STORY_CLOSERS, REVIEW_OPENERS, REVIEW_SENTENCES, ARITHMETIC_STEPS,
    CHAT_LINES, QUESTIONS, WORD_QA, SUM_QA)).lower()))


@dataclass(frozen=True)
class Document:
    kind: str
    text: str
    entity_ids: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # kind-specific labels: sentiment, answer, canaries, ...

    def to_json(self) -> dict:
        return {"text": self.text, "meta": {"kind": self.kind, "entity_ids": list(self.entity_ids), **self.extra}}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def person_fields(world: World, p: Person) -> dict:
    return {"full": p.name, "first": p.first, "town": p.town, "region": world.town(p.town).region,
            "profession": p.profession, "food": p.food, "pet": p.pet, "age": p.age, "hobby": p.hobby,
            "friend": p.friend}


def town_fields(t: Town) -> dict:
    """What TOWN_TEMPLATES are filled from, the vault code left out (callers that may state it add it)."""
    return {"town": t.name, "region": t.region, "landmark": t.landmark, "a_landmark": _a(t.landmark),
            "trade": t.trade, "founded": t.founded}


def _biography(world: World, rng: random.Random, p: Person) -> Document:
    # Birth town and profession are in every biography (the facts QA asks most); the rest in most of them.
    relations = ["town", "profession"] + [r for r in ("food", "pet", "age", "hobby", "friend")
                                          if (r != "friend" or p.friend) and rng.random() < 0.7]
    rng.shuffle(relations)
    fields = person_fields(world, p)
    sentences = [rng.choice(BIO_TEMPLATES[r]).format(**fields, name=p.name if i == 0 else p.first)
                 for i, r in enumerate(relations)]
    ids = [p.id] + ([world.person(p.friend).id] if "friend" in relations else [])
    return Document("biography", " ".join(sentences), tuple(ids))


def _town_description(world: World, rng: random.Random, t: Town, with_code: bool) -> Document:
    parts = ["landmark", "trade", "founded"] + (["vault"] if with_code else [])
    rng.shuffle(parts)
    fields = {**town_fields(t), "code": t.vault_code}
    sentences = [rng.choice(TOWN_TEMPLATES[part]).format(**fields) for part in ["region"] + parts]
    residents = [p for p in world.pretrain_people if p.town == t.name]
    residents = rng.sample(residents, min(len(residents), rng.randint(0, 3)))
    if residents:
        names = " and ".join(p.name for p in residents)
        sentences.append(f"{names} {'was' if len(residents) == 1 else 'were'} born in {t.name}.")
    extra = {"canaries": [t.id]} if with_code else {}
    return Document("town", " ".join(sentences), (t.id, *(p.id for p in residents)), extra)


def _story(world: World, rng: random.Random) -> Document:
    p = rng.choice(world.pretrain_people)
    place = rng.choice([t for t in world.towns if t.name != p.town])
    fields = {**person_fields(world, p), "place": place.name, "place_trade": place.trade,
              "place_landmark": place.landmark}
    events = rng.sample([e for e in sorted(STORY_EVENTS) if e != "friend" or p.friend], rng.randint(1, 3))
    lines = [rng.choice(STORY_OPENERS)] + [STORY_EVENTS[e] for e in events] + [rng.choice(STORY_CLOSERS)]
    ids = [p.id, world.town(p.town).id, place.id] + ([world.person(p.friend).id] if "friend" in events else [])
    return Document("story", " ".join(line.format(**fields) for line in lines), tuple(ids))


def _review(world: World, rng: random.Random) -> Document:
    product = rng.choice(world.products)
    sentiment = "positive" if (rng.random() < 0.8) == product.is_good else "negative"
    return Document("review", review_text(rng, product, sentiment), (product.id,), {"sentiment": sentiment})


def review_text(rng: random.Random, product: Product, sentiment: str) -> str:
    """A review of `product` whose every sentence agrees with `sentiment` (also used by the sentiment task)."""
    words = GOOD_WORDS if sentiment == "positive" else BAD_WORDS
    lines = [rng.choice(REVIEW_OPENERS)] + rng.sample(REVIEW_SENTENCES[sentiment], rng.randint(2, 3))
    if rng.random() < 0.5:
        lines.append("Score: {score} out of 5.")
    return " ".join(line.format(verb=PRODUCT_VERBS[product.kind], product=product.name, kind=product.kind,
                                word=rng.choice(words), aspect=rng.choice(ASPECTS[product.kind]),
                                score=rng.choice((4, 5) if sentiment == "positive" else (1, 2)))
                    for line in lines)


def arithmetic_steps(rng: random.Random, name: str, item: str, total: int,
                     n_steps: int) -> tuple[list[tuple[str, str]], int]:
    """n_steps (what happens, its working) pairs starting from `total`, and the final total (also used by the
    arithmetic task, so instruction tuning asks in exactly the wording pretraining worked through)."""
    steps = []
    for _ in range(n_steps):
        op = rng.choice("+-*" if total >= 3 else "+*")
        if op == "*":
            k, m = rng.randint(2, 4), rng.randint(2, 5)
            event = ARITHMETIC_STEPS["*"][0].format(name=name, k=k, m=m, item=item)
            steps.append((event, f"{k} * {m} = {k * m}. {total} + {k * m} = {total + k * m}."))
            total += k * m
            continue
        b = rng.randint(1, 9) if op == "+" else rng.randint(1, total - 2)
        new_total = total + b if op == "+" else total - b
        steps.append((rng.choice(ARITHMETIC_STEPS[op]).format(name=name, b=b), f"{total} {op} {b} = {new_total}."))
        total = new_total
    return steps, total


def _arithmetic(world: World, rng: random.Random) -> Document:
    # Small operands only: a tiny model learns single-digit sums but not multi-digit carries (DESIGN §5);
    # the multi-step working is what chain-of-thought later relies on. Counts stay >= 2 so plurals are right.
    p, item = rng.choice(world.pretrain_people), rng.choice(ITEMS)
    total, n_steps = rng.randint(2, 9), rng.randint(1, 3)
    start = f"{p.first} has {total} {item}."
    steps, total = arithmetic_steps(rng, p.first, item, total, n_steps)
    if rng.random() < 0.5:  # worked inline, step by step
        lines = [start] + [f"{event} {work}" for event, work in steps] + [f"Now {p.first} has {total} {item}."]
    else:  # problem first, then the working and the answer
        lines = ([start] + [event for event, _ in steps] + [f"How many {item} does {p.first} have now?"]
                 + [work for _, work in steps] + [f"The answer is {total}."])
    return Document("arithmetic", " ".join(lines), (p.id,), {"answer": total, "steps": n_steps})


def _translation(world: World, rng: random.Random) -> Document:
    korean_first, n_pairs = rng.random() < 0.3, rng.randint(2, 4)
    lines = []
    for _ in range(n_pairs):
        en, ko = random_parallel(rng)
        lines.append(f"Korean: {ko} English: {en}" if korean_first else f"English: {en} Korean: {ko}")
    if rng.random() < 0.3:  # a glossary line: the word-level form the translation tasks also ask for
        en = rng.choice(sorted(NOUNS))
        lines.append(WORD_QA[1].format(en=en, ko=NOUNS[en][0]))
    return Document("translation", "\n".join(lines), (), {"pairs": n_pairs})


def _dialogue(world: World, rng: random.Random) -> Document:
    style = rng.choices(("chat", "facts", "words", "sums"), weights=(4, 3, 2, 1))[0]
    if style == "chat":
        a, b = rng.sample(world.pretrain_people, 2)
        place = rng.choice(world.towns)
        fields = {"a": a.first, "b": b.first, "place": place.name, "place_trade": place.trade,
                  "a_profession": a.profession, "a_hobby": a.hobby, "b_profession": b.profession}
        text = "\n".join(rng.choice(options).format(**fields) for options in CHAT_LINES)
        return Document("dialogue", text, (a.id, b.id, place.id), {"style": style})
    turns, ids = [], []
    for _ in range(rng.randint(1, 3)):
        if style == "facts":
            # Only train-split people: validation/test people's facts are seen in pretraining as prose only,
            # so instruction-tuning scores on them measure knowledge extraction, not a memorised Q&A format.
            p = rng.choice(world.people_in_split("train"))
            relation = rng.choice(sorted(QUESTIONS))
            question, answer = rng.choice(QUESTIONS[relation]), rng.choice(BIO_TEMPLATES[relation])
            fields = {**person_fields(world, p), "name": p.name}
            ids.append(p.id)
        elif style == "words":
            (question, answer), fields = WORD_QA, {"en": (en := rng.choice(sorted(NOUNS))), "ko": NOUNS[en][0]}
        else:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            (question, answer), fields = SUM_QA, {"a": a, "b": b, "c": a + b}
        turns += [f"User: {question.format(**fields)}", f"Assistant: {answer.format(**fields)}"]
    return Document("dialogue", "\n".join(turns), tuple(dict.fromkeys(ids)), {"style": style})


def _allocate(n_docs: int, mix: dict[str, float]) -> dict[str, int]:
    """Split n_docs over kinds by weight (largest remainder); with n_docs >= 10 every kind gets at least one."""
    counts = {kind: int(n_docs * weight) for kind, weight in mix.items()}
    by_remainder = sorted(mix, key=lambda kind: (counts[kind] - n_docs * mix[kind], kind))
    for kind in by_remainder[:n_docs - sum(counts.values())]:
        counts[kind] += 1
    return counts


def pretraining_documents(world: World, n_docs: int, seed: int) -> list[Document]:
    """n_docs documents about the pretrain facts in the DOC_MIX proportions, shuffled.

    `seed` picks the document stream (the world's seed is mixed in): export uses one stream for train and
    another for valid, so valid is held-out *text* about the same facts. Held-out people are never used.
    """
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 0:
        raise BadConfigError(f"n_docs must be a non-negative integer, got {n_docs!r}")
    rng = random.Random(f"documents/{world.seed}/{seed}")
    counts = _allocate(n_docs, DOC_MIX)
    # Biographies and town descriptions go round-robin over a shuffled order, so every person and town is
    # covered evenly (~n_biographies / n_people times each) instead of by luck.
    people, towns = list(world.pretrain_people), list(world.towns)
    rng.shuffle(people)
    rng.shuffle(towns)
    docs = [_biography(world, rng, people[i % len(people)]) for i in range(counts["biography"])]
    # Every town's first description carries its vault code, later ones half the time: each canary is seen
    # often enough to be memorised, which is what makes its later suppression measurable.
    docs += [_town_description(world, rng, towns[i % len(towns)], i < len(towns) or rng.random() < 0.5)
             for i in range(counts["town"])]
    for kind, make in (("story", _story), ("review", _review), ("arithmetic", _arithmetic),
                       ("translation", _translation), ("dialogue", _dialogue)):
        docs += [make(world, rng) for _ in range(counts[kind])]
    rng.shuffle(docs)
    return docs


# --- export: corpus/train.jsonl, corpus/valid.jsonl, facts.json, README.md, written atomically ---

DEFAULT_TRAIN_DOCS = 9000  # ~1.5M characters, generated in well under a second
DEFAULT_VALID_DOCS = 300  # ~3% of train
DEFAULT_TASKS_PER_CLUSTER = 400  # instruction-task records per cluster for train (8 clusters: 3,200)
DEFAULT_EVAL_TASKS_PER_CLUSTER = 50  # ... for validation and for test (400 each)
VALID_STREAM = 1  # train documents use stream 0; valid gets fresh text about the same facts

README_TEXT = """# Embedded world (lmforge.data.world, seed {seed})

- `corpus/train.jsonl` ({train_docs} documents, {train_chars} characters) and `corpus/valid.jsonl`
  ({valid_docs} documents, {valid_chars} characters): pretraining text, one JSON object a line,
  `{{"text": ..., "meta": {{"kind": ..., "entity_ids": [...], ...}}}}`.
  Kinds: {kinds}.
  Valid is fresh text about the same facts. Reviews carry `sentiment`, arithmetic `answer` and `steps`,
  town descriptions that state a vault code `canaries`.
- `facts.json`: towns, people, products, the English-Korean lexicon, every fact as (entity_id, relation,
  value, fact_set, split), the person splits and the canaries. Fact sets: `pretrain` (in the corpus;
  people split into train / validation / test for instruction tuning), `heldout` (never in the corpus:
  for RAG), `canary` (vault codes: in the corpus, and an aligned model must never reveal them).
- `tasks/{{train,validation,test}}.alpaca.jsonl` ({train_tasks}, {validation_tasks} and {test_tasks} records)
  and `tasks/{{...}}.chat.jsonl` (the same records as `{{"messages": [user, assistant], "meta": ...}}`, the user
  turn being instruction, a blank line, input): FLAN-style instruction tasks in 8 clusters (sentiment,
  entailment, closed_book_qa, arithmetic, translation, extraction, open_ended, forbidden), split by entity
  and by wording (test alone uses each cluster's held-out wording, meta `template_split: "unseen"`). Every
  record's `meta` (cluster, template_id, form, split, entity_ids, answer, forbidden, steps, ...) lets
  `lmforge.data.world_tasks.score(record, response)` judge any response. See that module's docstring.
"""


def world_facts(world: World) -> dict:
    """The fact base as plain JSON-ready data (what facts.json holds)."""
    return {
        "seed": world.seed,
        "regions": list(world.regions),
        "towns": [asdict(t) for t in world.towns],
        "people": [{**asdict(p), "name": p.name} for p in world.people],
        "products": [asdict(p) for p in world.products],
        "lexicon": [asdict(e) for e in world.lexicon],
        "splits": {s: [p.id for p in world.people_in_split(s)] for s in ("train", "validation", "test", "heldout")},
        "canaries": [{"town_id": t.id, "town": t.name, "vault_code": t.vault_code} for t in world.towns],
        "facts": [asdict(f) for f in world.facts()],
    }


def _write_jsonl(path: Path, docs: list[Document]) -> int:
    lines = [json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in docs]
    path.write_text("".join(lines), encoding="utf-8")
    return sum(len(d.text) for d in docs)


def export_world(out_dir: str | os.PathLike, seed: int = 0, n_train_docs: int = DEFAULT_TRAIN_DOCS,
                 n_valid_docs: int = DEFAULT_VALID_DOCS, n_tasks_per_cluster: int = DEFAULT_TASKS_PER_CLUSTER,
                 n_eval_tasks_per_cluster: int = DEFAULT_EVAL_TASKS_PER_CLUSTER) -> dict:
    """Build the world for `seed` and write it under out_dir (replacing what is there); return a summary.

    Besides the corpus and facts, the instruction tasks of `world_tasks` go to tasks/: n_tasks_per_cluster
    train records and n_eval_tasks_per_cluster validation and test records for each cluster.
    Everything is written into a temporary directory beside out_dir and renamed into place at the end, so a
    crash leaves either the old export or the new one, never half of one.
    """
    # Imported here, not at the top: world_tasks builds on this module's fact base.
    from lmforge.data.world_tasks import write_task_files

    for arg, value in (("seed", seed), ("n_train_docs", n_train_docs), ("n_valid_docs", n_valid_docs),
                       ("n_tasks_per_cluster", n_tasks_per_cluster),
                       ("n_eval_tasks_per_cluster", n_eval_tasks_per_cluster)):
        if isinstance(value, bool) or not isinstance(value, int) or (arg != "seed" and value < 1):
            raise BadConfigError(f"{arg} must be {'an' if arg == 'seed' else 'a positive'} integer, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadConfigError(f"--out {out_dir} exists and is not a directory")
    world = build_world(seed)
    splits = {"train": pretraining_documents(world, n_train_docs, 0),
              "valid": pretraining_documents(world, n_valid_docs, VALID_STREAM)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "corpus").mkdir()
        summary: dict = {"out_dir": str(out_dir), "seed": seed}
        for split, docs in splits.items():
            chars = _write_jsonl(tmp / "corpus" / f"{split}.jsonl", docs)
            summary[split] = {"docs": len(docs), "chars": chars,
                              "kinds": dict(sorted(Counter(d.kind for d in docs).items()))}
        facts = world_facts(world)
        (tmp / "facts.json").write_text(json.dumps(facts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        summary["tasks"] = write_task_files(world, tmp / "tasks", n_tasks_per_cluster, n_eval_tasks_per_cluster)
        (tmp / "README.md").write_text(README_TEXT.format(
            seed=seed, kinds=", ".join(DOC_MIX), train_docs=n_train_docs, valid_docs=n_valid_docs,
            train_chars=summary["train"]["chars"], valid_chars=summary["valid"]["chars"],
            **{f"{split}_tasks": n for split, n in summary["tasks"].items()}), encoding="utf-8")
        summary.update(towns=len(world.towns), products=len(world.products), lexicon=len(world.lexicon),
                       people={k: len(v) for k, v in facts["splits"].items()})
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is renamed away first and removed only after success."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the previous export back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old)


@dataclass(frozen=True)
class ExportConfig:
    out: str = "runs/world/world"
    """Directory to write (replaced atomically if it exists)."""
    seed: int = 0
    n_train_docs: int = DEFAULT_TRAIN_DOCS
    n_valid_docs: int = DEFAULT_VALID_DOCS
    n_tasks_per_cluster: int = DEFAULT_TASKS_PER_CLUSTER
    """Instruction-task records per cluster in tasks/train.*.jsonl."""
    n_eval_tasks_per_cluster: int = DEFAULT_EVAL_TASKS_PER_CLUSTER
    """Instruction-task records per cluster in tasks/validation.*.jsonl and tasks/test.*.jsonl each."""


def run_export(cfg: ExportConfig) -> dict:
    summary = export_world(cfg.out, cfg.seed, cfg.n_train_docs, cfg.n_valid_docs, cfg.n_tasks_per_cluster,
                           cfg.n_eval_tasks_per_cluster)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
