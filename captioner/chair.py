"""CHAIR: how often captions name objects that are not in the image.

Rohrbach, Hendricks, Burns, Darrell and Saenko, "Object Hallucination in Image Captioning"
(EMNLP 2018). A caption "hallucinates" an object when it names one of the 80 COCO object
categories that the image does not contain. Two rates:

    CHAIR-s = captions naming at least one absent object / all captions
    CHAIR-i = absent objects named / all objects named (each object once per caption)

The paper takes an image's objects from its COCO segmentation masks plus its reference
captions. Flickr8k has no masks, so here the ground truth is what the references say: an
object is present when ANY reference caption of the image names it. That makes the table
below do all the work: a synonym it misses turns an honest caption into a hallucination,
and a word it wrongly includes invents objects. `leave_one_out` scores the first human
caption of each image against the others: the human baseline, and a check on the table.
(Reference captions are not exhaustive, so even people "hallucinate" a few per cent.)

Besides CHAIR, `chair()` reports how many captions repeat themselves ("a white shirt and a
white shirt", "a dog dog"), the other common failure of small LSTM decoders.

Plain functions and no torch, so that it runs anywhere captions and references do.
"""
import re
from collections import Counter

# ---------------------------------------------------------------------------------------
# The table: COCO category -> the words and phrases that name it (singular; plurals are
# made by `plural`). Words that could name two things are left out when the wrong reading
# is common in captions, because a false match costs more than a miss: a miss only
# loses a mention, a false match can invent a hallucination. Each such choice is noted.
OBJECT_WORDS = {
    "person": (
        "person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "infant",
        "adult", "teenager", "teen", "youth", "youngster", "lady", "guy", "gentleman", "dude", "human",
        "someone", "somebody", "individual", "crowd", "audience", "team", "mom",
        "father", "dad", "son", "daughter", "brother", "sister", "grandmother", "grandfather", "wife",
        "husband", "bride", "groom", "friend", "student", "tourist", "traveler", "passenger",
        "pedestrian", "spectator", "shopper", "vendor", "customer", "worker", "chef", "cook", "baker",
        "waiter", "waitress", "doctor", "nurse", "soldier", "policeman", "police officer", "cop",
        "officer", "fireman", "firefighter", "fisherman", "businessman", "cowboy", "cowgirl",
        "player", "athlete", "skier", "surfer", "skateboarder", "skater", "snowboarder", "rider",
        "biker", "cyclist", "bicyclist", "motorcyclist", "driver", "jockey", "batter", "catcher",
        "umpire", "referee", "coach", "runner", "jogger", "swimmer", "diver", "climber", "hiker",
        "dancer", "performer", "musician", "singer", "guitarist", "drummer", "clown", "gymnast",
        "wrestler", "cheerleader", "ballerina", "kayaker", "wakeboarder", "boarder", "goalie",
        "goalkeeper", "quarterback", "priest", "monk", "nun", "pastor", "rafter",
        # Left out: "fan" (a ceiling fan), "boxer" (a dog breed), "couple" and "group" ("a couple
        # of dogs"), "male"/"female" (mostly "a female dog"), "pitcher" (a jug of water on COCO's
        # kitchen tables as often as a baseball player), "police" (the word, not a person),
        # "mother" and "family" ("a mother elephant", "a family of giraffes").
    ),
    "bicycle": ("bicycle", "tricycle", "mountain bike", "bmx bike"),  # "bike" itself: see AMBIGUOUS
    # "scooter" is left out: a kick scooter in Flickr8k, a motor scooter in COCO.
    "car": ("car", "automobile", "van", "minivan", "sedan", "suv", "jeep", "taxi", "cab", "limo",
            "limousine", "convertible", "race car", "police car"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "motor cycle", "dirt bike", "moped", "motor scooter"),
    "airplane": ("airplane", "aeroplane", "plane", "airliner", "jetliner", "jet", "aircraft",
                 "passenger jet", "jumbo jet", "biplane", "seaplane"),
    "bus": ("bus", "minibus", "double decker", "school bus", "trolley bus"),
    "train": ("train", "locomotive", "tram", "trolley", "streetcar", "train car", "passenger train",
              "subway train", "subway car", "railway car", "rail car", "railroad car", "cable car", "caboose"),
    "truck": ("truck", "lorry", "pickup truck", "fire truck", "firetruck", "tow truck", "semi truck"),
    "boat": ("boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "raft", "rowboat",
             "speedboat", "motorboat", "jet ski", "gondola", "tugboat", "barge", "vessel"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal"),
    # Left out: "street light", a lamp post, not a traffic light.
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),  # a bare "meter" in a caption is a parking meter
    "bench": ("bench", "pew"),
    "bird": ("bird", "duck", "goose", "seagull", "gull", "pigeon", "swan", "parrot", "owl", "eagle",
             "hawk", "pelican", "flamingo", "heron", "crow", "sparrow", "rooster", "hen", "peacock",
             "ostrich", "penguin", "finch", "robin", "duckling"),
    # Left out: "turkey" and "chicken" (more often food than birds), "crane" (construction),
    # "dove" ("dove into the water").
    "cat": ("cat", "kitten", "kitty", "tabby"),
    "dog": ("dog", "puppy", "pup", "doggy", "doggie", "canine", "terrier", "poodle", "retriever",
            "labrador", "lab", "collie", "sheepdog", "sheep dog", "bulldog", "greyhound", "dachshund",
            "husky", "chihuahua", "beagle", "spaniel", "pug", "dalmatian", "shepherd", "german shepherd",
            "rottweiler", "doberman", "schnauzer", "hound", "mutt", "corgi", "pitbull", "pit bull"),
    # "lab" and "shepherd" are nearly always dogs in captions; "boxer" is not (see person).
    "horse": ("horse", "pony", "foal", "colt", "stallion", "mare"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),  # not "goat": COCO has no goat, and it is no sheep
    "cow": ("cow", "cattle", "calf", "bull", "ox", "heifer"),  # not "steer": "steers the boat"
    "elephant": ("elephant",),
    "bear": ("bear", "polar bear", "grizzly", "panda"),  # not "cub" (lion cubs, bear cubs)
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack", "rucksack", "book bag", "bookbag"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "hand bag", "purse"),  # not "bag": plastic bags, bean bags, sleeping bags
    "tie": ("tie", "necktie", "bow tie", "bowtie"),  # not "bow": hair bows, a boat's bow
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee", "flying disc", "disc"),  # Flickr8k's dogs catch "discs"
    "skis": ("skis", "pair of skis"),
    # Singular "ski" is left out: it is nearly always a modifier ("ski slope", "ski lift").
    # So is the common misspelling "skies": "cloudy skies" is as common.
    "snowboard": ("snowboard", "snow board"),
    "sports ball": ("ball", "sports ball"),
    # Any "... ball" (soccer ball, tennis ball) ends in "ball". Game names are left out:
    # "baseball", "football", "soccer", "basketball" mostly name the sport, not the ball
    # (in references they do imply a ball: see IMPLIED).
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),  # a bat in a caption is a baseball (or cricket) bat
    "baseball glove": ("baseball glove", "baseball mitt", "mitt"),  # not "glove": winter gloves
    "skateboard": ("skateboard", "skate board"),  # not "board": surf-, snow-, cutting boards
    "surfboard": ("surfboard", "surf board", "boogie board", "bodyboard", "paddle board", "paddleboard"),
    "tennis racket": ("tennis racket", "tennis racquet", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass", "glass of wine", "glasses of wine"),
    # Not bare "glass": glass doors, a glass of milk.
    "cup": ("cup", "mug", "teacup", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger", "sub sandwich", "panini"),
    # COCO files burgers under sandwich. Left out: "sub" (subway, submarine), "wrap" (a verb).
    "orange": ("oranges",),
    # Only the plural: singular "orange" is nearly always the colour ("an orange shirt").
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "armchair", "stool", "high chair", "highchair", "lawn chair"),
    # Not "seat": toilet seats, car seats, bike seats.
    "couch": ("couch", "sofa", "loveseat", "love seat", "futon"),
    "potted plant": ("potted plant", "houseplant", "house plant", "pot plant", "flower pot", "flowerpot"),
    # Not bare "plant": plants outdoors are not potted plants.
    "bed": ("bed",),
    "dining table": ("table", "dining table", "desk", "computer desk", "kitchen table", "coffee table"),
    # COCO's "dining table" takes every table; desks are annotated as tables too.
    "toilet": ("toilet", "urinal", "commode", "toilet seat"),
    "tv": ("tv", "television", "monitor", "computer monitor", "computer screen"),
    # COCO annotates computer screens as tv. Not "screen": projector screens, phone screens.
    "laptop": ("laptop", "laptop computer", "notebook computer", "macbook"),  # "computer": AMBIGUOUS
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller", "game controller", "tv remote", "television remote"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "mobile phone", "phone", "smartphone", "smart phone",
                   "iphone", "telephone"),
    "microwave": ("microwave", "microwave oven"),
    "oven": ("oven", "stove", "stovetop", "stove top"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors", "pair of scissors"),
    "teddy bear": ("teddy bear", "teddy", "teddybear", "stuffed bear", "stuffed animal", "stuffed toy"),
    # COCO's teddy bears are stuffed animals of every kind; "stuffed bear" must not read as a bear.
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer", "blow drier"),
    "toothbrush": ("toothbrush", "tooth brush"),
}

# Words that name one of several objects. In a caption such a word counts as whichever
# reading the image has (a "bike" beside references that say "motorcycle" is that
# motorcycle), and as the first reading when the image has none. "bike" is the common
# case: Flickr8k and COCO captions say it of bicycles and motorcycles alike.
AMBIGUOUS = {
    "bike": ("bicycle", "motorcycle"),
    "computer": ("laptop", "tv", "keyboard"),  # a laptop, or a desktop's screen and keyboard
    "desktop computer": ("tv", "keyboard"),
}

# Phrases that contain an object word but name no object (or no object in the picture).
# They are matched like the phrases above and then dropped.
NOT_OBJECTS = (
    "dvd player", "cd player", "record player", "mp3 player",  # devices, not people
    "bus stop", "bus station", "train track", "train station", "train platform", "railroad track",
    "jet of water", "jets of water", "water jet",  # no vehicle needed
    "chair lift", "wheel chair", "wheelchair",  # COCO has no wheelchair, and it is no chair
    "flower bed", "river bed", "truck bed",  # ground and cargo beds
    "tie dye", "tie dyed",  # a shirt pattern, from "tie-dye"
    "cowboy hat", "sandwich board", "book shelf", "baby pool", "hot tub", "skate bowl", "super bowl", "lab coat",
    "baseball cap", "baseball hat", "ball cap", "tennis shoe",  # clothes: no ball, no game (see IMPLIED)
    "men s room", "mens room", "ladies room",  # the restroom, not people in it
    "corn dog",  # food, not a dog (and not a COCO hot dog)
)

# A baby elephant is an elephant, not a baby and an elephant; a passenger jet carries people
# the caption does not mention. Before a non-person object these words qualify it and are
# not counted themselves.
QUALIFIERS = ("baby", "adult", "passenger")

# Ground truth only: words in a reference that imply an object it does not name. "A skier
# on the slope" has skis; "two men playing tennis" have rackets and a ball. The paper's
# ground truth has COCO's segmentation masks for these; without masks, counting a caption
# that names the skis of a skier as a hallucination would only measure the references'
# brevity. Captions get no such credit: a caption is scored on the objects it names.
# Words inside a NOT_OBJECTS phrase imply nothing: a "baseball cap" implies no ball.
IMPLIED = {
    "skier": ("skis",), "skiing": ("skis",),
    "snowboarder": ("snowboard",), "snowboarding": ("snowboard",),
    "surfer": ("surfboard",), "surfing": ("surfboard",),
    "skateboarder": ("skateboard",), "skateboarding": ("skateboard",),
    "cyclist": ("bicycle",), "bicyclist": ("bicycle",), "biking": ("bicycle",), "cycling": ("bicycle",),
    "motorcyclist": ("motorcycle",),
    "kayaker": ("boat",), "kayaking": ("boat",), "canoeing": ("boat",), "rafting": ("boat",),
    "kiteboarder": ("kite",), "kiteboarding": ("kite",), "kitesurfer": ("kite",), "kitesurfing": ("kite",),
    "wii": ("remote",),  # Wii controllers are COCO remotes
    "tennis": ("tennis racket", "sports ball"),
    "baseball": ("sports ball",), "softball": ("sports ball",), "soccer": ("sports ball",),
    "football": ("sports ball",), "basketball": ("sports ball",), "volleyball": ("sports ball",),
    "rugby": ("sports ball",),
}

# Irregular plurals; everything else follows the usual English endings in `plural`.
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "knife": "knives",
    "mouse": "mice", "ox": "oxen", "calf": "calves", "goose": "geese", "sheep": "sheep",
    "cattle": "cattle", "people": "people", "broccoli": "broccoli", "luggage": "luggage",
    "skis": "skis", "scissors": "scissors", "oranges": "oranges", "tv": "tvs", "hair": "hair",
    "human": "humans", "shepherd": "shepherds", "youth": "youths",
}


def plural(word):
    """The plural of a noun, or of a phrase's last word ("hot dog" -> "hot dogs")."""
    if " " in word:
        head, last = word.rsplit(" ", 1)
        return f"{head} {plural(last)}"
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("man"):  # policeman -> policemen, fisherman -> fishermen
        return word[:-3] + "men"
    if word.endswith(("s", "sh", "ch", "x", "z")):  # bus, brush, couch, box
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":  # puppy -> puppies, not guy -> guies
        return word[:-1] + "ies"
    return word + "s"


def _build_lookup():
    """Word tuple -> the objects it may name: one for most words, several for AMBIGUOUS ones,
    none for NOT_OBJECTS. Covers singulars and plurals."""
    lookup = {}

    def add(phrase, objects):
        for form in (phrase, plural(phrase)):
            key = tuple(form.split())
            # The table must not give one word two meanings: fail at import, not silently.
            if lookup.get(key, objects) != objects:
                raise ValueError(f"{form!r} names both {lookup[key]} and {objects}")
            lookup[key] = objects

    for obj, names in OBJECT_WORDS.items():
        for name in names:
            add(name, (obj,))
    for name, objects in AMBIGUOUS.items():
        add(name, objects)
    for phrase in NOT_OBJECTS:
        add(phrase, ())
    # "baby elephant" -> elephant: a qualifier before any single-word non-person object.
    for q in QUALIFIERS:
        for key, objects in list(lookup.items()):
            if len(key) == 1 and objects and "person" not in objects:
                lookup.setdefault((q, *key), objects)
    return lookup


_LOOKUP = _build_lookup()
_LONGEST = max(len(k) for k in _LOOKUP)
_IMPLIED = {form: objs for word, objs in IMPLIED.items() for form in (word, plural(word))}
_TOKEN = re.compile(r"[a-z]+")


def words(text):
    """Lower-case word tokens; digits and punctuation split words and are dropped."""
    return _TOKEN.findall(text.lower())


def _object_phrases(text, implied=False):
    """The readings of each object phrase in the text, left to right: [("dog",), ("bicycle",
    "motorcycle"), ...]. At each word the longest phrase wins, so "hot dog" is a hot dog (not
    a dog), "teddy bear" a teddy bear (not a bear) and "bus stop" nothing at all. With
    `implied`, words outside NOT_OBJECTS phrases add the objects IMPLIED by them."""
    tokens = words(text)
    found = []
    i = 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            objects = _LOOKUP.get(tuple(tokens[i:i + n]))
            if objects is not None:
                break
        else:
            objects, n = None, 1
        if objects:
            found.append(objects)
        if implied and objects != ():  # a NOT_OBJECTS phrase ("baseball cap") implies nothing
            found.extend((obj,) for word in tokens[i:i + n] for obj in _IMPLIED.get(word, ()))
        i += n
    return found


def _pick(objects, present):
    """One reading of a (possibly ambiguous) word: one the image has, else the first."""
    return next((obj for obj in objects if obj in present), objects[0])


def mentioned_objects(caption, present=()):
    """The COCO objects a caption names, each once, in order of first mention. `present`
    (the image's objects, if known) settles ambiguous words such as "bike"."""
    found = []
    for objects in _object_phrases(caption):
        obj = _pick(objects, present)
        if obj not in found:
            found.append(obj)
    return found


def reference_objects(references):
    """The objects an image holds: everything that ANY of its reference captions names, plus
    what their words imply (IMPLIED). Ambiguous words are read last, against the rest."""
    phrases = [objects for ref in references for objects in _object_phrases(ref, implied=True)]
    sure = {objects[0] for objects in phrases if len(objects) == 1}
    return sure | {_pick(objects, sure) for objects in phrases if len(objects) > 1}


def repeated_ngram(caption, n=3):
    """Whether a caption doubles a word (two identical tokens in a row: "a dog dog") or
    repeats a word n-gram anywhere ("a white shirt and a white shirt" repeats "a white shirt";
    occurrences may overlap). Both are the loops a greedy or beam decoder falls into."""
    tokens = words(caption)
    if any(a == b for a, b in zip(tokens, tokens[1:], strict=False)):
        return True
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def chair(captions, references):
    """captions: {image_id: caption}; references: {image_id: [reference captions]}.

    Returns a dict:
      "CHAIR-s"      share of captions that name at least one object absent from the image
      "CHAIR-i"      share of object mentions (each object once per caption) that are absent
      "repeats"      share of captions with a doubled word or a repeated trigram
      "captions"     number of captions scored
      "mentions"     number of object mentions (the CHAIR-i denominator)
      "hallucinations"  number of absent mentions (the CHAIR-i numerator)
      "hallucinated" [(object, count), ...], most often hallucinated first
      "per_image"    {image_id: [absent objects the caption names]} ([] = nothing absent)
    """
    if not captions:
        raise ValueError("no captions to score")
    missing = set(captions) - set(references)
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no references, e.g. {next(iter(missing))!r}")
    per_image = {}
    counts = Counter()
    mentions = repeats = 0
    for image_id, caption in captions.items():
        present = reference_objects(references[image_id])
        named = mentioned_objects(caption, present)
        absent = [obj for obj in named if obj not in present]
        per_image[image_id] = absent
        counts.update(absent)
        mentions += len(named)
        repeats += repeated_ngram(caption)
    n = len(captions)
    hallucinations = sum(counts.values())
    return {
        "CHAIR-s": sum(1 for absent in per_image.values() if absent) / n,
        # A set of captions that names no object at all hallucinates nothing.
        "CHAIR-i": hallucinations / mentions if mentions else 0.0,
        "repeats": repeats / n,
        "captions": n,
        "mentions": mentions,
        "hallucinations": hallucinations,
        "hallucinated": counts.most_common(),
        "per_image": per_image,
    }


def leave_one_out(references):
    """The human baseline: each image's first reference scored against the others. What
    CHAIR-s it gets is the floor a model can be compared with (people disagree about what
    is worth naming), and the captions it flags show the table's missing synonyms."""
    usable = {k: refs for k, refs in references.items() if len(refs) > 1}
    return chair({k: refs[0] for k, refs in usable.items()}, {k: refs[1:] for k, refs in usable.items()})
