"""Write ``last_word.tsv``: short English passages whose last word is predictable from context.

    python benchmarks/data/make_last_word.py          # rewrites benchmarks/data/last_word.tsv

A LAMBADA-style task of our own making (no downloads): every item is a passage without its
last word and that word. Four kinds, all written here and filled deterministically
(``random.Random(0)``):

- ``recall``: the word was named earlier in the passage (a pet, an instrument, a city, ...);
- ``idiom``: the end of a common English saying, after a lead-in sentence;
- ``fact``: capitals, the next weekday or month, opposites, animal sounds, number words;
- ``pattern``: a short list whose next element follows a pattern stated in the passage.

Columns: ``id``, ``kind``, ``context`` (no trailing space), ``target`` (one word, letters only).
The first word the model generates after ``context`` is compared with ``target``, ignoring case.
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).with_name("last_word.tsv")

NAMES = [
    ("Anna", "she"), ("Tom", "he"), ("Maria", "she"), ("David", "he"), ("Sophie", "she"), ("James", "he"),
    ("Lena", "she"), ("Peter", "he"), ("Clara", "she"), ("Omar", "he"), ("Julia", "she"), ("Lucas", "he"),
    ("Emma", "she"), ("Noah", "he"), ("Grace", "she"), ("Daniel", "he"), ("Alice", "she"), ("Samuel", "he"),
]
POSSESSIVE = {"she": "her", "he": "his"}
OBJECT = {"she": "her", "he": "him"}

# (template, slot values). Slots: {name} {pron} {Pron} {pos} {Pos} {obj} {x} (the target) {y} (a helper).
RECALL = [
    (
        "{name} kept an old {x} in the corner of {pos} room. Every evening after dinner {pron} picked it up "
        "and played for an hour. One night {pos} neighbour knocked on the door and asked if {pron} could "
        "teach her to play the",
        ["guitar", "piano", "violin", "cello", "trumpet", "flute", "harp", "banjo", "saxophone", "clarinet",
         "ukulele", "accordion", "harmonica", "trombone"],
    ),
    (
        "The little bakery on the corner sold the best {x} in town. Every Sunday morning {name} walked there "
        "before anyone else was awake. The baker always smiled and handed {obj} a paper bag with two warm",
        ["croissants", "muffins", "bagels", "scones", "pretzels", "doughnuts", "cookies", "rolls", "cupcakes",
         "brownies", "waffles", "pancakes"],
    ),
    (
        "When {name} was a child, {pron} had a {x} called {y}. {Pron} fed it every morning and played with it "
        "every afternoon. Years later {pron} still kept a photo of {y}, {pos} beloved",
        ["dog", "cat", "rabbit", "parrot", "hamster", "turtle", "horse", "goat", "pony", "duck", "pig", "lizard"],
    ),
    (
        "{name} had always dreamed of visiting {x}. {Pron} saved money for three years, learned a few phrases "
        "and finally bought a ticket. When the plane landed, {pron} smiled: after all those years, {pron} was "
        "finally in",
        ["Paris", "Tokyo", "Rome", "London", "Cairo", "Sydney", "Lisbon", "Vienna", "Prague", "Dublin", "Madrid",
         "Berlin", "Istanbul", "Chicago", "Toronto", "Athens", "Oslo", "Seoul"],
    ),
    (
        "The detective walked slowly around the room. There was a broken window, a spilled cup of tea and a "
        "muddy {x} next to the sofa. Whoever had been here had left in a hurry. She bent down and carefully "
        "picked up the muddy",
        ["boot", "glove", "umbrella", "scarf", "hat", "shoe", "jacket", "sock", "backpack", "towel"],
    ),
    (
        "In April {name} planted {x} in the garden behind the house. All summer {pron} watered them and pulled "
        "out the weeds. In September {pron} proudly carried a basket full of fresh",
        ["tomatoes", "carrots", "potatoes", "beans", "peppers", "cucumbers", "onions", "strawberries", "radishes",
         "peas", "pumpkins", "beets"],
    ),
    (
        "My grandfather worked as a {x} for forty years. He loved his work and never missed a single day. Even "
        "now, long after he retired, people in our village still call him the old",
        ["baker", "carpenter", "fisherman", "teacher", "doctor", "farmer", "blacksmith", "tailor", "postman",
         "butcher", "shoemaker", "sailor", "painter", "gardener", "miller"],
    ),
    (
        "At the zoo the children spent most of the day watching the {x}. They laughed when the animals "
        "splashed in the water and cheered when the keeper brought their food. On the bus home every child "
        "agreed that the best part of the trip had been the",
        ["elephants", "penguins", "giraffes", "monkeys", "lions", "tigers", "zebras", "bears", "seals", "hippos",
         "kangaroos", "flamingos", "gorillas"],
    ),
    (
        "{name} knocked over a glass of {x} and it spilled all over the new white carpet. {Pron} scrubbed the "
        "stain with soap and water, but it would not come out. When {pos} mother came home, the whole room "
        "still smelled of",
        ["coffee", "wine", "milk", "juice", "tea", "vinegar", "beer", "lemonade", "whisky", "perfume"],
    ),
    (
        "{name} opened the drawer and found a small wooden {x}. Inside it was a letter from {pos} grandmother. "
        "{Pron} read the letter twice, wiped {pos} eyes, and then carefully put it back in the",
        ["box", "envelope", "jar", "tin", "chest", "case", "basket", "folder"],
    ),
    (
        "The recipe called for three cups of flour, two eggs and a spoonful of {x}. {name} searched every "
        "cupboard in the kitchen, but {pron} had run out. So {pron} put on {pos} coat and walked to the shop "
        "on the corner to buy some",
        ["cinnamon", "sugar", "salt", "honey", "butter", "vanilla", "ginger", "nutmeg", "cocoa", "yeast"],
    ),
    (
        "{name} lost {pos} {x} on the train to work. {Pron} called the station twice, but nobody had found it. "
        "That evening {pos} brother gave {obj} an old one of his own, and {pron} thanked him warmly for the",
        ["umbrella", "wallet", "phone", "scarf", "watch", "laptop", "notebook", "jacket", "hat", "camera"],
    ),
    (
        "Every summer {name}'s family rented a small cabin by the {x}. The children swam all day and the "
        "parents read books in the shade. When autumn came, {pron} always felt sad to leave the",
        ["lake", "river", "sea", "beach", "forest", "mountains", "coast", "waterfall"],
    ),
    (
        "The museum's most famous painting showed a {x} standing alone in a field. Thousands of visitors came "
        "every year just to see it. The guide told us that the artist had spent ten years painting the",
        ["horse", "woman", "tree", "windmill", "soldier", "farmer", "lighthouse", "child", "deer", "church"],
    ),
    (
        "{name} was learning to speak {x}. Every morning {pron} practised for thirty minutes with an app, and "
        "every evening {pron} watched a film with subtitles. After a year, {pron} could finally hold a whole "
        "conversation in",
        ["Spanish", "French", "German", "Italian", "Japanese", "Portuguese", "Russian", "Chinese", "Arabic",
         "Dutch", "Greek", "Korean"],
    ),
    (
        "For {pos} birthday {name} asked for only one thing: a {y} {x}. {Pos} parents searched every shop in "
        "the city until they found one. When {pron} unwrapped the present, {pron} shouted with joy and hugged "
        "the {y}",
        ["bicycle", "kite", "telescope", "puppy", "guitar", "skateboard", "tent", "microscope", "drum"],
    ),
]
PET_NAMES = ["Max", "Bella", "Charlie", "Luna", "Rocky", "Daisy", "Oscar", "Milo", "Coco", "Buddy"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "silver", "purple"]

IDIOMS = [
    ("they stayed together and lived happily ever", "after"),
    ("it was raining cats and", "dogs"),
    ("you should not count your chickens before they", "hatch"),
    ("the early bird catches the", "worm"),
    ("actions speak louder than", "words"),
    ("it is better late than", "never"),
    ("an apple a day keeps the doctor", "away"),
    ("every cloud has a silver", "lining"),
    ("you can kill two birds with one", "stone"),
    ("something like that only happens once in a blue", "moon"),
    ("curiosity killed the", "cat"),
    ("practice makes", "perfect"),
    ("the pen is mightier than the", "sword"),
    ("Rome was not built in a", "day"),
    ("time flies when you are having", "fun"),
    ("two heads are better than", "one"),
    ("you should always look before you", "leap"),
    ("where there is smoke, there is", "fire"),
    ("slow and steady wins the", "race"),
    ("the grass is always greener on the other", "side"),
    ("you should never judge a book by its", "cover"),
    ("beauty is in the eye of the", "beholder"),
    ("birds of a feather flock", "together"),
    ("honesty is the best", "policy"),
    ("if you want to get stronger, remember: no pain, no", "gain"),
    ("out of sight, out of", "mind"),
    ("when it comes to parties, the more the", "merrier"),
    ("knowledge is", "power"),
    ("laughter is the best", "medicine"),
    ("money does not grow on", "trees"),
    ("the apple does not fall far from the", "tree"),
    ("you cannot have your cake and eat it", "too"),
    ("a penny saved is a penny", "earned"),
    ("with that remark you really hit the nail on the", "head"),
    ("he finally let the cat out of the", "bag"),
    ("it is no use crying over spilt", "milk"),
    ("that setback was really a blessing in", "disguise"),
    ("cheap souvenirs like these are a dime a", "dozen"),
    ("all that glitters is not", "gold"),
    ("an eye for an eye, a tooth for a", "tooth"),
    ("do not put all your eggs in one", "basket"),
    ("a picture is worth a thousand", "words"),
    ("the road to hell is paved with good", "intentions"),
    ("great minds think", "alike"),
    ("too many cooks spoil the", "broth"),
    ("a watched pot never", "boils"),
    ("necessity is the mother of", "invention"),
    ("you cannot teach an old dog new", "tricks"),
    ("a bird in the hand is worth two in the", "bush"),
    ("still waters run", "deep"),
    ("the best things in life are", "free"),
    ("when the cat is away, the mice will", "play"),
    ("every dog has its", "day"),
    ("one man's trash is another man's", "treasure"),
]
IDIOM_LEADS = [
    "My grandmother had a saying for everything. When we told her the story, she just nodded and said that",
    "Our teacher wrote a proverb on the board and explained it to the class:",
    "Everyone in the office knew the old saying, and the manager repeated it at the meeting:",
    "After listening to the whole story, my father laughed and reminded me that",
]

CAPITALS = [
    ("Madrid", "Spain"), ("Berlin", "Germany"), ("Tokyo", "Japan"), ("Ottawa", "Canada"), ("Cairo", "Egypt"),
    ("Athens", "Greece"), ("Lisbon", "Portugal"), ("Moscow", "Russia"), ("Beijing", "China"), ("Dublin", "Ireland"),
    ("Oslo", "Norway"), ("Stockholm", "Sweden"), ("Warsaw", "Poland"), ("Vienna", "Austria"), ("Rome", "Italy"),
    ("Canberra", "Australia"), ("Nairobi", "Kenya"), ("Lima", "Peru"), ("Havana", "Cuba"), ("Bangkok", "Thailand"),
    ("Helsinki", "Finland"), ("Budapest", "Hungary"), ("Copenhagen", "Denmark"), ("Brussels", "Belgium"),
    ("Amsterdam", "Netherlands"), ("Seoul", "Korea"), ("Ankara", "Turkey"), ("Santiago", "Chile"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OPPOSITES = [
    ("up", "down"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"), ("rich", "poor"),
    ("young", "old"), ("strong", "weak"), ("empty", "full"), ("true", "false"), ("wet", "dry"), ("day", "night"),
    ("black", "white"), ("heavy", "light"), ("inside", "outside"), ("loud", "quiet"), ("first", "last"),
    ("north", "south"), ("push", "pull"), ("buy", "sell"), ("love", "hate"), ("winter", "summer"),
    ("question", "answer"), ("friend", "enemy"),
]
SOUNDS = [
    ("cow", "moos"), ("dog", "barks"), ("cat", "meows"), ("lion", "roars"), ("duck", "quacks"), ("sheep", "bleats"),
    ("horse", "neighs"), ("snake", "hisses"), ("owl", "hoots"), ("pig", "grunts"), ("bee", "buzzes"),
]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def _fill(template: str, target: str, rng: random.Random) -> str:
    name, pron = rng.choice(NAMES)
    helper = rng.choice(PET_NAMES) if "called {y}" in template else rng.choice(COLOURS)
    return template.format(
        name=name, pron=pron, Pron=pron.capitalize(), pos=POSSESSIVE[pron], Pos=POSSESSIVE[pron].capitalize(),
        obj=OBJECT[pron], x=target, y=helper,
    )


def recall_items(rng: random.Random) -> list[tuple[str, str, str]]:
    items = []
    for template, targets in RECALL:
        for target in targets:
            items.append(("recall", _fill(template, target, rng), target))
    return items


def idiom_items(rng: random.Random) -> list[tuple[str, str, str]]:
    return [("idiom", f"{rng.choice(IDIOM_LEADS)} {saying}", target) for saying, target in IDIOMS]


def fact_items(rng: random.Random) -> list[tuple[str, str, str]]:
    items = []
    for city, country in CAPITALS:
        items.append(("fact", f"Paris is the capital of France, and {city} is the capital of", country))
    for i, day in enumerate(DAYS):
        items.append(("fact", f"Yesterday was {DAYS[i - 1]}, so today is {day} and tomorrow will be", DAYS[(i + 1) % 7]))
    for i, month in enumerate(MONTHS):
        items.append(("fact", f"The month after {MONTHS[i - 1]} is {month}, and the month after {month} is",
                      MONTHS[(i + 1) % 12]))
    for word, opposite in OPPOSITES:
        items.append(("fact", f"The opposite of hot is cold, and the opposite of {word} is", opposite))
    for animal, sound in SOUNDS:
        other, other_sound = rng.choice([s for s in SOUNDS if s[0] != animal])
        items.append(("fact", f"Every child knows that a {other} {other_sound} and a {animal}", sound))
    return items


def pattern_items(rng: random.Random) -> list[tuple[str, str, str]]:
    items = []
    for start in range(0, 8):
        seq = ", ".join(NUMBERS[start : start + 4])
        items.append(("pattern", f"The children counted slowly out loud: {seq},", NUMBERS[start + 4]))
    for start in range(0, 4):
        seq = ", ".join(DAYS[start : start + 3])
        items.append(("pattern", f"The shop is open on {seq} and", DAYS[start + 3]))
    words = ["red", "apple", "river", "paper", "stone", "music", "garden", "window", "silver", "candle", "forest", "bread"]
    for word in words:
        items.append(("pattern", f"The parrot could only say one word. It said {word}, then {word} again, and then once "
                      "more it said", word))
    return items


def main() -> None:
    rng = random.Random(0)
    items = recall_items(rng) + idiom_items(rng) + fact_items(rng) + pattern_items(rng)
    lines = ["id\tkind\tcontext\ttarget"]
    for index, (kind, context, target) in enumerate(items):
        assert "\t" not in context and target.isalpha(), (context, target)
        lines.append(f"{index}\t{kind}\t{context}\t{target}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
