"""Value pools and sentence templates of the demo task (see `demo_task`).

Every value pool comes as a (train, test) pair with no value in common, so a model can only
score on the test split by really extracting (copying spans it has never seen in training into
the right keys), not by recalling values. Phrasing pools are pairs too, but both splits use both
halves (see `demo_task`).
"""

from __future__ import annotations

FIRST_NAMES = (
    ("Priya", "Marcus", "Elena", "Tomasz", "Aisha", "Liam", "Sofia", "Kenji", "Fatima", "Oliver", "Ingrid",
     "Mateo", "Chloe", "Dmitri", "Amara", "Lucas", "Hannah", "Ravi", "Isabel", "Jonas", "Mei", "Samuel",
     "Leila", "Viktor", "Grace", "Omar", "Freya", "Diego", "Nadia", "Henrik", "Zara", "Felix", "Yuki",
     "Andrea", "Kwame", "Maya", "Pablo", "Clara", "Arjun", "Eva"),
    ("Laura", "Daniel", "Julia", "Thomas", "Anna", "Peter", "Sarah", "Martin", "Emma", "David", "Lisa",
     "Michael", "Nora", "Robert", "Alice"),
)
LAST_NAMES = (
    ("Natarajan", "Okafor", "Lindqvist", "Kowalski", "Haddad", "Brennan", "Rossi", "Tanaka", "Mensah",
     "Fischer", "Dubois", "Novak", "Patel", "Gallagher", "Moreau", "Ivanova", "Santos", "Bergstrom",
     "Chen", "Adeyemi", "Schmidt", "Kaur", "Walsh", "Petrov", "Yilmaz", "Costa", "Nakamura", "Jensen",
     "Alvarez", "Murphy", "Horvath", "Ibrahim", "Larsen", "Moretti", "Kim", "Oyelaran", "Silva",
     "Andersen", "Varga", "Reyes"),
    ("Miller", "Becker", "Wagner", "Lopez", "Taylor", "Martin", "Weber", "Clarke", "Young", "Baker",
     "Hughes", "Turner", "Parker", "Evans", "Cooper"),
)
CITIES = (
    ("Lisbon", "Oslo", "Madrid", "Vienna", "Prague", "Dublin", "Athens", "Warsaw", "Helsinki", "Zurich",
     "Brussels", "Copenhagen", "Budapest", "Milan", "Munich", "Lyon", "Porto", "Seville", "Krakow", "Riga",
     "Tallinn", "Vilnius", "Bucharest", "Bratislava", "Istanbul", "Cairo", "Nairobi", "Lagos", "Toronto",
     "Chicago", "Boston", "Denver", "Seattle", "Mexico City", "Lima", "Santiago", "Tokyo", "Seoul",
     "Singapore", "Sydney", "New York", "Buenos Aires"),
    # Test cities avoid prefixes of training cities (Dubai/Dublin) and names with common aliases
    # (Mumbai/Bombay): a 135M model confuses those however well it extracts.
    ("Paris", "London", "Berlin", "Rome", "Amsterdam", "Stockholm", "Hamburg", "Vancouver", "Miami",
     "Geneva", "Bangkok", "Florence", "Shanghai", "Melbourne", "Auckland", "Montreal"),
)
MONTHS = (
    ("January", "February", "March", "May", "June", "August", "September", "November"),
    ("April", "July", "October", "December"),
)
SEATS = ((1, 2, 3, 5, 6, 8), (4, 7, 9))
# Loyalty codes look like "QX-48213": two letters, a dash, five digits. The letter sets are
# disjoint, so no code (nor prefix) of the test split occurs in training.
CODE_LETTERS = ("ABCDEFGHJK", "LMNPQRSTUVWXYZ")

# Request templates. Placeholders: {n} seats (digits, copied verbatim), {seats}/{tickets}/
# {people}/{passengers} the matching noun (singular for 1), {src}, {dst}, {date}.
CORE = (
    (
        "could you book {n} {seats} on the {src} to {dst} flight on {date}?",
        "I need {n} {tickets} from {src} to {dst} for {date}.",
        "please reserve {n} {seats} flying {src} -> {dst} on {date}.",
        "we are {n} {people} travelling from {src} to {dst} on {date}, can you sort out the booking?",
        "looking to fly to {dst} from {src} on {date}, {n} {seats} please.",
        "{date}: {src} to {dst}, {n} {passengers}.",
        "can I get {n} {tickets} for {date}, departing {src}, arriving {dst}?",
        "I'd like to book a flight from {src} to {dst}. Date: {date}. Seats: {n}.",
        "book me on the {date} flight from {src} into {dst} - {n} {seats}.",
        "need to get from {src} to {dst} on {date}. Please hold {n} {seats}.",
        "route {src} > {dst}, date {date}, {n} {passengers}.",
        "I want to travel to {dst} on {date}, leaving from {src}, {n} {people} in total.",
        "requesting {n} {seats}: {src} to {dst}, {date}.",
        "please book the {src} - {dst} connection on {date} for {n} {passengers}.",
        "departure city {src}, destination {dst}, travel date {date}, number of seats {n}.",
        "hoping to fly out of {src} on {date}, heading to {dst}. {n} {tickets}, please.",
        "is there room for {n} {people} on a flight from {src} to {dst} on {date}? Please book it.",
        "we fly {date} - {src} to {dst}. Could you reserve {n} {seats}?",
    ),
    (  # more phrasings
        "could you arrange {n} {seats} to {dst}? We leave {src} on {date}.",
        "flight request / from: {src} / to: {dst} / when: {date} / how many: {n}",
        "on {date} I have to be in {dst}, starting in {src}. {n} {tickets} needed.",
        "any chance of {n} {seats} out of {src} bound for {dst} on {date}?",
    ),
)
INTROS = (
    ("Hi, this is {name}.", "Hello, my name is {name}.", "{name} here.", "Good morning! I'm {name}.",
     "Dear team, {name} writing.", "Hey, it's {name}."),
    ("Greetings from {name}.",),
)
SIGNATURES = (
    ("Thanks, {name}", "Best regards, {name}", "- {name}", "Cheers, {name}", "Many thanks! {name}"),
    ("Kind regards, {name}",),
)
OPENERS = ("Hi,", "Hello,", "", "Good afternoon,", "Hi there!")
LOYALTY = (
    ("my loyalty number is {code}.", "frequent flyer number: {code}.", "please add my membership {code}.",
     "(member ID {code})", "use loyalty account {code} for the points.", "loyalty: {code}."),
    ("my rewards code is {code}.",),
)
