"""Synthetic, labelled English review sentences for the default sentiment model.

Why synthetic: queuebert must build its default classifier offline, reproducibly
and from PyPI packages only, so it cannot download a sentiment corpus. Instead
this module composes short reviews (products, restaurants, hotels, films,
books, games, apps and services) from templates and word lists.

Everything here (templates, word lists, phrases) was written for queuebert and
is covered by the project's own license (Apache-2.0); no third-party data is
used. The held-out evaluation set in ``examples/reviews-heldout.jsonl`` was
written separately and is never read by this module.

The generator deliberately covers the ways real reviews express sentiment:
evaluative adjectives, concrete events ("stopped working after a week"),
opinions and recommendations, negation ("not worth it", "no complaints"),
contrast ("pricey, but worth it": the clause after "but" decides), star
ratings, comparisons and multi-sentence reviews. Output is a pure function of
``(n, seed)`` so that model builds are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

LABELS: tuple[str, str] = ("NEGATIVE", "POSITIVE")
NEGATIVE, POSITIVE = 0, 1


class Example(NamedTuple):
    """One training sentence and its label id (0 = NEGATIVE, 1 = POSITIVE)."""

    text: str
    label: int


@dataclass(frozen=True)
class Aspect:
    """Something a reviewer judges (e.g. "service") with words for both polarities."""

    nouns: tuple[str, ...]
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    plural: bool = False


@dataclass(frozen=True)
class Domain:
    """A review domain: what is reviewed, its aspects and typical events."""

    subjects: tuple[str, ...]
    aspects: tuple[Aspect, ...]
    pos_events: tuple[str, ...]
    neg_events: tuple[str, ...]
    pos_verdicts: tuple[str, ...]
    neg_verdicts: tuple[str, ...]


def _t(text: str) -> tuple[str, ...]:
    """Split a ``|``-separated word list; keeps the tables below compact."""
    return tuple(w.strip() for w in text.split("|") if w.strip())


# --------------------------------------------------------------------------
# Generic vocabulary (any domain)
# --------------------------------------------------------------------------

POS_ADJ = _t(
    "great|excellent|fantastic|wonderful|amazing|superb|outstanding|lovely|brilliant|"
    "terrific|fabulous|impressive|awesome|perfect|marvelous|splendid|exceptional|"
    "delightful|first-rate|top-notch|solid|reliable|pleasant|enjoyable|good|nice|"
    "phenomenal|stellar|magnificent|flawless|incredible|remarkable|charming|"
    "satisfying|well made|high quality|worthwhile|fun|refreshing|cool|sweet|neat|"
    "decent|dependable|sturdy|polished|beautiful|gorgeous|stunning"
)
NEG_ADJ = _t(
    "terrible|awful|horrible|bad|poor|disappointing|mediocre|dreadful|lousy|abysmal|"
    "atrocious|useless|pathetic|subpar|unacceptable|frustrating|annoying|cheap|"
    "shoddy|flimsy|defective|faulty|unreliable|overpriced|disgusting|dire|miserable|"
    "appalling|underwhelming|forgettable|pointless|worthless|rubbish|garbage|"
    "broken|inferior|sloppy|a mess|a disaster|a joke|unbearable|painful|"
    "ridiculous|dismal|terrible quality|poorly made|a letdown|not worth it"
)
# Adjectives that work attributively ("a ___ phone"); multi-word/noun-like
# entries above are excluded from that slot.
POS_ATTR = tuple(a for a in POS_ADJ if " " not in a)
NEG_ATTR = tuple(
    a for a in NEG_ADJ if " " not in a and a not in {"broken"}
) + ("poorly made", "low quality", "second-rate", "badly made")

INTENS = _t(
    "really|very|so|truly|absolutely|incredibly|extremely|pretty|super|genuinely|"
    "quite|remarkably|seriously|totally|just|honestly"
) + ("",) * 8

POS_OPINION = _t(
    "love|adore|really like|really enjoyed|am thrilled with|am delighted with|"
    "am very happy with|am impressed with|can't get enough of|am so pleased with|"
    "highly recommend|am in love with|enjoyed every bit of|would gladly buy again|"
    "have no regrets about|am glad I chose|keep coming back to|am satisfied with"
)
NEG_OPINION = _t(
    "hate|regret buying|really dislike|am disappointed with|am fed up with|"
    "can't stand|am frustrated with|am unhappy with|deeply regret choosing|"
    "would never buy|wasted my money on|am annoyed with|am sorry I chose|"
    "want a refund for|gave up on|am not happy with|can't recommend|am let down by"
)

POS_FEEL = _t(
    "happy with|pleased with|delighted with|thrilled with|impressed with|impressed by|"
    "satisfied with|excited about|grateful for|blown away by|over the moon with|"
    "glad I chose|content with|amazed by|in love with"
)
NEG_FEEL = _t(
    "disappointed with|disappointed by|frustrated with|annoyed with|unhappy with|"
    "upset about|angry about|let down by|fed up with|dissatisfied with|disgusted by|"
    "furious about|unimpressed with|sorry I bothered with|embarrassed by"
)

POS_CLOSERS = _t(
    "Highly recommended.|Would recommend to anyone.|Would buy again.|Ten out of ten.|"
    "Five stars.|Two thumbs up.|Definitely worth it.|Can't recommend it enough.|"
    "Love it!|Very happy customer.|Money well spent.|Great buy.|A must-have.|"
    "Absolutely worth the money.|We'll be back!|I'm a fan.|No complaints at all.|"
    "Nothing to complain about.|Couldn't be happier.|Exceeded every expectation.|"
    "Go, you won't regret it.|Total winner.|Best decision I've made in a while.|"
    "Would happily go back.|Keep up the good work!|A real treat.|Simply the best.|"
    "Will order again.|Worth the hype.|Thank you so much!|Superb value.|"
    "Highly satisfied.|Very impressed overall.|Perfect in every way.|Five stars from me."
)
NEG_CLOSERS = _t(
    "Avoid.|Avoid at all costs.|Would not recommend.|Never again.|Zero stars if I could.|"
    "One star.|Don't waste your money.|Total rip-off.|Save yourself the trouble.|"
    "Returning it.|Not worth a penny.|Stay away.|Huge disappointment.|Do not buy.|"
    "What a waste.|Thumbs down.|I want my money back.|Not impressed.|Skip it.|"
    "Complete rubbish.|Two stars is generous.|Really regret it.|Never ordering again.|"
    "Not coming back.|Look elsewhere.|Very poor overall.|Big mistake.|So disappointing.|"
    "Such a letdown.|Buyer beware.|Absolutely awful.|Worst experience ever.|"
    "Not recommended.|A total failure.|Deeply disappointed."
)

# Mild, opposite-polarity remarks used in "X, but Y" contrasts: the main
# clause decides the label, these only add realistic noise.
MILD_NEG = _t(
    "it's a bit pricey|it took a while to arrive|the packaging was plain|"
    "the instructions were a little vague|it's slightly heavier than expected|"
    "parking was tricky|we had to wait a few minutes|the color is a bit darker than pictured|"
    "it's not cheap|the first few minutes are slow|the menu is small|"
    "the room was a little small|setup took a while|it runs a bit warm|"
    "it was a bit loud inside|I had my doubts at first|the reviews scared me a little|"
    "the box was dented|it's not the fastest|the decor is a bit dated"
)
MILD_POS = _t(
    "it looks nice|the packaging was pretty|the price was low|the staff smiled|"
    "the location is convenient|the idea is interesting|the first episode was okay|"
    "the color is nice|the trailer looked good|delivery was fast|the menu looks great|"
    "the lobby is pretty|the box was nice|the cast is famous|it's cheap|"
    "the logo is cute|the photos looked good|the reviews were great|"
    "it started well|the website was easy to use"
)

COMPARE_REFS = _t(
    "the last one I had|my old one|the competition|what I expected|the reviews said|"
    "the other places in town|the original|the previous version|similar brands|"
    "anything else I've tried|the expensive brands|last year's model|the photos|"
    "the place next door|the first book"
)

DURATIONS = _t(
    "two days|a week|three weeks|a month|two uses|one use|a few hours|ten minutes|"
    "the first wash|a couple of days|one trip|five minutes|a fortnight|six weeks"
)
LONG_DURATIONS = _t(
    "a year|two years|months|six months|three years|a whole year|hundreds of uses|"
    "daily use|a long trip|heavy use"
)


# --------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------

_PRODUCT_COMMON_POS_EVENTS = _t(
    "It works perfectly.|It arrived a day early and works great.|"
    "It has worked flawlessly for {long}.|Still going strong after {long}.|"
    "It does everything I need.|It does exactly what it says.|"
    "Setup was quick and painless.|It was easy to set up and just works.|"
    "It feels solid and well built.|It was a great gift.|"
    "My whole family uses it every day.|It paid for itself within a month.|"
    "The seller shipped it fast and packed it well.|It looks even better in person.|"
    "Customer service replaced it without any hassle.|I bought a second one for my parents.|"
    "It has made my life so much easier.|It survived {long} without a scratch.|"
    "It's the best thing I've bought in ages.|No problems whatsoever."
)
_PRODUCT_COMMON_NEG_EVENTS = _t(
    "It stopped working after {short}.|It broke after {short}.|"
    "It arrived broken.|It arrived scratched and missing parts.|"
    "It died after {short}.|It fell apart after {short}.|"
    "It never worked properly.|It doesn't even turn on.|"
    "The seller never answered my emails.|Support refused to help.|"
    "It looks nothing like the photos.|I had to return it.|"
    "It broke the second day.|It overheats constantly.|It feels like a cheap toy.|"
    "It failed after {short} and the warranty was useless.|"
    "The refund took forever.|Half the features don't work.|"
    "It started making a grinding noise after {short}.|It smells like burnt plastic."
)

ELECTRONICS = Domain(
    subjects=_t(
        "phone|laptop|tablet|camera|speaker|charger|keyboard|mouse|monitor|TV|"
        "smartwatch|router|printer|earbuds|headphones|e-reader|power bank|webcam|"
        "soundbar|game console|drone|fitness tracker|projector|microphone"
    ),
    aspects=(
        Aspect(_t("battery|battery life"), _t("excellent|amazing|great|long-lasting|impressive|superb"),
               _t("terrible|awful|weak|pathetic|disappointing|short|useless")),
        Aspect(_t("screen|display"), _t("bright|sharp|gorgeous|crisp|vivid|stunning|beautiful"),
               _t("dim|blurry|washed out|grainy|dull|flickery|cracked")),
        Aspect(_t("sound|sound quality|audio"), _t("crisp|rich|clear|amazing|full|balanced|superb"),
               _t("tinny|muffled|distorted|flat|awful|harsh|crackly")),
        Aspect(_t("build quality|build|design|finish"), _t("solid|premium|sleek|excellent|sturdy|elegant"),
               _t("flimsy|cheap|plasticky|poor|shoddy|fragile")),
        Aspect(_t("performance|speed|connection|software"), _t("fast|smooth|snappy|reliable|stable|flawless"),
               _t("slow|laggy|buggy|unstable|unreliable|sluggish|glitchy")),
        Aspect(_t("camera|picture quality|image quality"), _t("superb|sharp|fantastic|excellent|stunning"),
               _t("blurry|grainy|terrible|noisy|poor|washed out")),
        Aspect(_t("buttons|controls|keys"), _t("responsive|satisfying|intuitive|easy to use"),
               _t("mushy|sticky|unresponsive|awkward|stiff"), plural=True),
    ),
    pos_events=_PRODUCT_COMMON_POS_EVENTS + _t(
        "The battery easily lasts {long_day}.|It charges incredibly fast.|"
        "It pairs instantly with my phone.|The connection never drops.|"
        "Photos come out sharp even at night.|The noise cancelling blocks out everything.|"
        "It runs every game smoothly.|Boots up in seconds.|Wifi now reaches every room."
    ),
    neg_events=_PRODUCT_COMMON_NEG_EVENTS + _t(
        "The battery barely lasts {short_day}.|It takes forever to charge.|"
        "The bluetooth keeps disconnecting.|The screen cracked on its own.|"
        "It freezes every few minutes.|The charging port stopped working.|"
        "It crashes constantly.|The speaker buzzes at any volume.|"
        "Half the keys stopped responding.|The wifi drops every hour."
    ),
    pos_verdicts=_t(
        "Best {subject} I've ever owned.|A fantastic {subject} for the price.|"
        "This {subject} is worth every cent.|I'm really happy with this {subject}.|"
        "Hands down the best {subject} on the market."
    ),
    neg_verdicts=_t(
        "Worst {subject} I've ever owned.|This {subject} is a total waste of money.|"
        "Do not buy this {subject}.|This {subject} is junk.|"
        "I regret buying this {subject}."
    ),
)

HOME = Domain(
    subjects=_t(
        "blender|vacuum|coffee maker|kettle|toaster|air fryer|knife|frying pan|"
        "mattress|pillow|lamp|chair|desk|sofa|rug|fan|heater|drill|tent|backpack|"
        "suitcase|water bottle|stroller|dog bed|cookware set|office chair|shower head|"
        "jacket|pair of boots|pair of jeans|dress|sweater|pair of sneakers|raincoat|watch|"
        "moisturizer|shampoo|perfume|toy|board game|puzzle"
    ),
    aspects=(
        Aspect(_t("quality|material|fabric|craftsmanship"), _t("excellent|superb|soft|high quality|durable|lovely"),
               _t("cheap|thin|scratchy|poor|flimsy|awful")),
        Aspect(_t("fit|size|shape"), _t("perfect|spot on|true to size|just right|flattering"),
               _t("all wrong|way off|awkward|tiny|too small|unflattering")),
        Aspect(_t("design|look|color|style"), _t("beautiful|elegant|stylish|gorgeous|modern|lovely"),
               _t("ugly|tacky|dull|cheap looking|faded|hideous")),
        Aspect(_t("motor|suction|power"), _t("powerful|strong|impressive|excellent|quiet"),
               _t("weak|noisy|pathetic|feeble|loud|useless")),
        Aspect(_t("instructions|assembly|setup"), _t("easy|simple|straightforward|quick|clear"),
               _t("confusing|a nightmare|impossible|frustrating|useless|unclear")),
        Aspect(_t("price|value"), _t("great|fair|excellent|unbeatable|reasonable"),
               _t("outrageous|ridiculous|way too high|a rip-off|absurd")),
    ),
    pos_events=_PRODUCT_COMMON_POS_EVENTS + _t(
        "It keeps my coffee hot for hours.|It cleans up in seconds.|"
        "I sleep so much better now.|It kept us dry through a storm.|"
        "It fits perfectly and feels great.|The fabric is soft and washes well.|"
        "It picks up every crumb and hair.|My back pain is gone since I switched.|"
        "It still looks new after {long}.|Everything fit in easily."
    ),
    neg_events=_PRODUCT_COMMON_NEG_EVENTS + _t(
        "It leaks every time I use it.|The handle snapped off.|It shrank after {short_wash}.|"
        "The color faded after {short_wash}.|The seams split after {short}.|"
        "The zipper broke immediately.|It rusted after {short}.|"
        "It wobbles no matter what I do.|The stitching came apart.|"
        "It smells strongly of chemicals.|My back hurts every morning now.|"
        "It gave me a rash."
    ),
    pos_verdicts=_t(
        "Best {subject} I've ever bought.|A great {subject} at a fair price.|"
        "I'd buy this {subject} again in a heartbeat.|This {subject} is a keeper.|"
        "My favorite {subject} by far."
    ),
    neg_verdicts=_t(
        "Worst {subject} I've ever bought.|This {subject} is a complete waste of money.|"
        "Do not buy this {subject}.|This {subject} went straight back.|"
        "Cheapest-feeling {subject} I've ever used."
    ),
)

RESTAURANT = Domain(
    subjects=_t(
        "restaurant|cafe|bakery|diner|bistro|pizzeria|steakhouse|sushi bar|taqueria|"
        "food truck|pub|brunch place|noodle shop|burger joint|wine bar|ice cream shop|"
        "place|spot|buffet|tea room"
    ),
    aspects=(
        Aspect(_t("food|meal|dinner|lunch|breakfast|brunch"),
               _t("delicious|amazing|tasty|superb|fantastic|outstanding|excellent|fresh|wonderful"),
               _t("bland|awful|cold|inedible|terrible|disgusting|greasy|mediocre|tasteless")),
        Aspect(_t("pasta|pizza|steak|burger|soup|curry|salad|fish|chicken|ramen|sandwich|risotto"),
               _t("perfectly cooked|delicious|flavorful|fresh|hot|juicy|perfectly seasoned|superb"),
               _t("overcooked|undercooked|bland|soggy|cold|dry|salty|burnt|greasy|rubbery")),
        Aspect(_t("fries|tacos|dumplings|noodles|pancakes|wings|ribs|oysters|desserts|pastries"),
               _t("delicious|crispy|fresh|amazing|perfect|mouthwatering|incredible"),
               _t("soggy|stale|greasy|cold|bland|burnt|chewy|dry"), plural=True),
        Aspect(_t("service|waiter|waitress|server|staff|host|bartender"),
               _t("friendly|attentive|warm|quick|helpful|welcoming|professional|charming"),
               _t("rude|slow|inattentive|dismissive|unfriendly|careless|clueless|unprofessional")),
        Aspect(_t("atmosphere|ambience|decor|vibe|music"),
               _t("cozy|lovely|relaxed|charming|inviting|perfect|beautiful"),
               _t("noisy|cramped|depressing|dingy|chaotic|loud|tacky")),
        Aspect(_t("coffee|wine|cocktail|beer|tea|espresso"),
               _t("excellent|perfect|smooth|delicious|strong|fantastic"),
               _t("burnt|watery|weak|sour|flat|awful|lukewarm")),
        Aspect(_t("portions|prices"), _t("generous|fair|reasonable|huge|great"),
               _t("tiny|stingy|outrageous|absurd|insulting"), plural=True),
    ),
    pos_events=_t(
        "We were seated right away.|The food came out hot and fast.|"
        "The chef came out to check on us.|They made a special dish for my allergy.|"
        "Every dish was a hit.|We cleaned our plates.|"
        "The waiter recommended the perfect wine.|They gave us free dessert for our anniversary.|"
        "We left full and happy.|I'm already planning our next visit.|"
        "The kids loved every bite.|Even the bread was amazing.|"
        "They squeezed us in without a reservation.|Our drinks were never empty.|"
        "Everything tasted homemade."
    ),
    neg_events=_t(
        "We waited over an hour for our food.|They lost our reservation.|"
        "Our order came out wrong twice.|I found a hair in my soup.|"
        "The waiter ignored us all night.|We got food poisoning.|"
        "They charged us for drinks we never ordered.|The table was sticky and dirty.|"
        "Half the menu was unavailable.|We left hungry.|"
        "The manager argued with us instead of apologizing.|The food arrived cold.|"
        "We had to ask three times for water.|They rushed us out the door.|"
        "My steak came out raw."
    ),
    pos_verdicts=_t(
        "Best {subject} in town.|Our new favorite {subject}.|A wonderful little {subject}.|"
        "This {subject} never disappoints.|An absolute gem of a {subject}."
    ),
    neg_verdicts=_t(
        "Worst {subject} in town.|This {subject} is a tourist trap.|"
        "Never eating at this {subject} again.|Avoid this {subject}.|"
        "This {subject} has really gone downhill."
    ),
)

HOTEL = Domain(
    subjects=_t(
        "hotel|resort|hostel|inn|motel|guesthouse|apartment|cabin|B&B|lodge|villa|"
        "rental|suite|campsite|cottage"
    ),
    aspects=(
        Aspect(_t("room|bathroom|suite|bed|shower|balcony"),
               _t("spotless|clean|spacious|comfortable|cozy|modern|beautiful|quiet|huge"),
               _t("dirty|filthy|tiny|cramped|moldy|noisy|uncomfortable|dated|smelly")),
        Aspect(_t("staff|receptionist|front desk|concierge|host|manager|housekeeping"),
               _t("friendly|helpful|welcoming|kind|professional|attentive|lovely"),
               _t("rude|unhelpful|dismissive|useless|hostile|incompetent")),
        Aspect(_t("location|view|neighborhood"), _t("perfect|unbeatable|stunning|central|convenient|ideal"),
               _t("terrible|sketchy|remote|inconvenient|depressing|unsafe")),
        Aspect(_t("breakfast|pool|gym|spa|wifi"), _t("excellent|great|fantastic|generous|clean|relaxing"),
               _t("awful|dirty|overcrowded|useless|pathetic|broken")),
        Aspect(_t("sheets|towels|pillows|beds"), _t("soft|fresh|clean|comfortable|luxurious"),
               _t("stained|scratchy|dirty|thin|lumpy"), plural=True),
    ),
    pos_events=_t(
        "Check-in took two minutes.|They upgraded us to a suite.|"
        "We slept like babies.|Housekeeping was thorough every day.|"
        "They let us check out late at no charge.|The view from our window was breathtaking.|"
        "Everything was within walking distance.|They left a sweet note for our anniversary.|"
        "They arranged a taxi for us at 4 am.|We felt completely at home.|"
        "The room was ready early.|We're already booking our next stay."
    ),
    neg_events=_t(
        "Our room wasn't ready until evening.|We found bugs in the bed.|"
        "The air conditioning never worked.|There was no hot water.|"
        "They charged us hidden fees at checkout.|The walls were so thin we heard everything.|"
        "Construction noise started at 7 am.|They gave our room away.|"
        "The sheets had stains on them.|The elevator was broken all week.|"
        "Nobody answered the phone at reception.|We couldn't sleep because of the noise.|"
        "The place looked nothing like the photos."
    ),
    pos_verdicts=_t(
        "Best {subject} we've ever stayed at.|A lovely {subject}.|"
        "We'd stay at this {subject} again in a heartbeat.|This {subject} is a hidden gem.|"
        "Perfect {subject} for a weekend away."
    ),
    neg_verdicts=_t(
        "Worst {subject} we've ever stayed at.|This {subject} is a dump.|"
        "Never staying at this {subject} again.|Avoid this {subject}.|"
        "This {subject} was a nightmare."
    ),
)

MEDIA = Domain(
    subjects=_t(
        "movie|film|show|series|documentary|sequel|novel|book|memoir|album|song|"
        "game|play|musical|podcast|comedy|thriller|horror movie|season|anime|concert"
    ),
    aspects=(
        Aspect(_t("plot|story|storyline|script|writing|premise"),
               _t("gripping|clever|brilliant|original|engaging|moving|compelling|tight"),
               _t("boring|predictable|nonsensical|lazy|clichéd|confusing|thin|tedious")),
        Aspect(_t("acting|cast|lead actor|performances|characters"),
               _t("superb|brilliant|outstanding|convincing|phenomenal|wonderful|believable"),
               _t("wooden|terrible|awful|unconvincing|flat|cringeworthy|forgettable")),
        Aspect(_t("ending|pacing|dialogue|humor|direction|twist"),
               _t("perfect|satisfying|sharp|hilarious|masterful|brilliant|clever"),
               _t("terrible|rushed|clunky|unfunny|sloppy|awful|cheap|obvious")),
        Aspect(_t("soundtrack|music|visuals|cinematography|animation|graphics|art"),
               _t("stunning|beautiful|gorgeous|breathtaking|incredible|haunting"),
               _t("ugly|cheap|annoying|dated|jarring|grating")),
        Aspect(_t("gameplay|controls|levels|puzzles|chapters|episodes"),
               _t("addictive|fun|smooth|clever|engaging|satisfying"),
               _t("repetitive|clunky|boring|frustrating|tedious|broken"), plural=True),
    ),
    pos_events=_t(
        "I couldn't look away.|It kept me on the edge of my seat.|"
        "I laughed the whole way through.|I finished it in one sitting.|"
        "I've already watched it twice.|The ending left me speechless.|"
        "The whole theater applauded at the end.|I stayed up all night to finish it.|"
        "I've had the soundtrack on repeat all week.|I was hooked from the first page.|"
        "It moved me to tears in the best way.|I can't wait for the next one.|"
        "I've played it for a hundred hours and still love it."
    ),
    neg_events=_t(
        "I nodded off an hour in.|We walked out after an hour.|"
        "I couldn't finish it.|I checked my phone the whole time.|"
        "Nothing happens for two hours.|I guessed the ending in the first ten minutes.|"
        "Half the audience left early.|I want my two hours back.|"
        "I gave up after three chapters.|The game crashed and wiped my save.|"
        "Not a single joke landed.|I forgot it the moment it ended.|"
        "It dragged on forever."
    ),
    pos_verdicts=_t(
        "Best {subject} of the year.|A {subject} I'll never forget.|"
        "This {subject} is a masterpiece.|An instant classic of a {subject}.|"
        "Easily my favorite {subject} in years."
    ),
    neg_verdicts=_t(
        "Worst {subject} of the year.|This {subject} is a mess.|"
        "Skip this {subject}.|A painfully dull {subject}.|"
        "This {subject} is an insult to its fans."
    ),
)

SOFTWARE = Domain(
    subjects=_t(
        "app|website|software|program|browser extension|platform|service|tool|"
        "video editor|banking app|fitness app|language app|music app|photo app|"
        "streaming service|online store|password manager|note-taking app|mobile game"
    ),
    aspects=(
        Aspect(_t("interface|design|layout|user experience|navigation"),
               _t("clean|intuitive|simple|beautiful|elegant|easy to use|slick"),
               _t("confusing|cluttered|ugly|clunky|frustrating|outdated|awful")),
        Aspect(_t("update|latest version|new version|redesign"),
               _t("fantastic|a big improvement|excellent|great|smooth"),
               _t("awful|a disaster|terrible|a huge step back|broken|buggy")),
        Aspect(_t("app|website|sync|search|login"),
               _t("fast|reliable|smooth|seamless|snappy|rock solid"),
               _t("slow|buggy|unreliable|broken|glitchy|unusable")),
        Aspect(_t("support|customer service|help desk|subscription"),
               _t("helpful|fast|responsive|excellent|fair|friendly"),
               _t("useless|slow|unresponsive|a scam|rude|overpriced")),
        Aspect(_t("features|notifications|ads|tutorials"),
               _t("useful|helpful|well thought out|excellent|handy"),
               _t("annoying|useless|intrusive|pointless|broken|excessive"), plural=True),
    ),
    pos_events=_t(
        "It never crashes.|It syncs instantly across all my devices.|"
        "It saves me an hour every day.|Support fixed my issue within minutes.|"
        "The latest update made it even faster.|I use it every single day.|"
        "It's the first app I open every morning.|It works offline too.|"
        "Signing up took thirty seconds.|It has completely replaced three other apps for me."
    ),
    neg_events=_t(
        "It crashes every time I open it.|It deleted all my data.|"
        "It keeps logging me out.|It drains my battery in hours.|"
        "Support never responded.|They charged me after I canceled.|"
        "The update broke everything.|It freezes on the loading screen.|"
        "Every screen is covered in ads.|It won't even install.|"
        "I lost all my progress after the update."
    ),
    pos_verdicts=_t(
        "Best {subject} I've used.|A fantastic {subject}.|This {subject} is worth paying for.|"
        "I can't imagine life without this {subject}.|The {subject} everyone should have."
    ),
    neg_verdicts=_t(
        "Worst {subject} I've used.|This {subject} is garbage.|Uninstall this {subject}.|"
        "This {subject} is a scam.|The most frustrating {subject} ever."
    ),
)

SERVICES = Domain(
    subjects=_t(
        "delivery service|airline|gym|salon|barber|dentist|mechanic|plumber|"
        "moving company|bank|taxi company|internet provider|dry cleaner|tour|"
        "cooking class|car rental|vet|clinic|spa|yoga studio|courier"
    ),
    aspects=(
        Aspect(_t("staff|team|technician|driver|instructor|guide|stylist|agent"),
               _t("friendly|professional|knowledgeable|kind|helpful|punctual|patient|skilled"),
               _t("rude|unprofessional|late|careless|clueless|lazy|condescending")),
        Aspect(_t("service|experience|delivery|communication|booking process"),
               _t("excellent|seamless|smooth|fast|outstanding|flawless|painless"),
               _t("terrible|a nightmare|slow|chaotic|awful|horrible|a joke")),
        Aspect(_t("price|pricing|fee|quote"), _t("fair|reasonable|honest|transparent|great"),
               _t("outrageous|a rip-off|dishonest|hidden|absurd")),
    ),
    pos_events=_t(
        "They showed up right on time.|They fixed it in under an hour.|"
        "My package arrived a day early.|They explained everything clearly.|"
        "They went above and beyond for us.|The flight landed early.|"
        "They refunded me without any questions.|They remembered my name.|"
        "The job was done perfectly the first time."
    ),
    neg_events=_t(
        "They never showed up.|My package was left in the rain.|"
        "They overcharged me and refused to fix it.|The flight was delayed for six hours.|"
        "They lost my luggage.|I was on hold for two hours.|"
        "They broke something and denied it.|The problem came back the next day.|"
        "They canceled on me at the last minute.|Nobody ever called me back."
    ),
    pos_verdicts=_t(
        "Best {subject} I've ever used.|A fantastic {subject}.|I'll use this {subject} again.|"
        "Can't recommend this {subject} enough."
    ),
    neg_verdicts=_t(
        "Worst {subject} I've ever used.|This {subject} is a joke.|Never using this {subject} again.|"
        "Avoid this {subject} at all costs."
    ),
)

DOMAINS: tuple[Domain, ...] = (ELECTRONICS, HOME, RESTAURANT, HOTEL, MEDIA, SOFTWARE, SERVICES)

_SLOTS: dict[str, tuple[str, ...]] = {
    "long": LONG_DURATIONS,
    "short": DURATIONS,
    "long_day": _t("all day|two full days|a whole week|through a long shift"),
    "short_day": _t("two hours|half a day|until lunch|an hour"),
    "short_wash": _t("one wash|the first wash|two washes"),
}


# --------------------------------------------------------------------------
# Sentence builders: each returns a clause/sentence of the requested polarity
# --------------------------------------------------------------------------

Builder = Callable[[random.Random, Domain, int], str]


def _fill(rng: random.Random, template: str, domain: Domain) -> str:
    """Fill ``{slot}`` placeholders in a phrase from the slot tables."""
    for slot, values in _SLOTS.items():
        token = "{" + slot + "}"
        while token in template:
            template = template.replace(token, rng.choice(values), 1)
    if "{subject}" in template:
        template = template.replace("{subject}", rng.choice(domain.subjects))
    return template


def _pick(rng: random.Random, pos: tuple[str, ...], neg: tuple[str, ...], polarity: int) -> str:
    return rng.choice(pos if polarity == POSITIVE else neg)


def _intens(rng: random.Random, adj: str) -> str:
    word = rng.choice(INTENS)
    # "very a disaster" is not English; only intensify single adjectives.
    if not word or adj.startswith(("a ", "an ", "not ", "all ", "way ", "spot ", "just ", "true ")):
        return adj
    return f"{word} {adj}"


def _was(rng: random.Random, plural: bool) -> str:
    if plural:
        return rng.choice(("were", "are", "were", "were"))
    return rng.choice(("was", "is", "was", "was"))


def aspect_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """"The service was really friendly" style clause."""
    aspect = rng.choice(domain.aspects)
    noun = rng.choice(aspect.nouns)
    adj = _pick(rng, aspect.pos, aspect.neg, polarity)
    return f"The {noun} {_was(rng, aspect.plural)} {_intens(rng, adj)}"


def subject_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """"This phone is absolutely fantastic" style clause."""
    subject = rng.choice(domain.subjects)
    adj = _pick(rng, POS_ADJ, NEG_ADJ, polarity)
    det = rng.choice(("This", "The", "This", "That"))
    return f"{det} {subject} {rng.choice(('is', 'was', 'is'))} {_intens(rng, adj)}"


def noun_phrase(rng: random.Random, domain: Domain, polarity: int) -> str:
    """"Friendly staff and spotless rooms" style fragment (no verb)."""
    parts = []
    for aspect in rng.sample(domain.aspects, k=min(len(domain.aspects), rng.choice((1, 2, 2, 3)))):
        # Only plain adjectives read naturally before a noun ("a rip-off price" does not).
        words = aspect.pos if polarity == POSITIVE else aspect.neg
        adjs = [a for a in words if " " not in a or a.endswith("ly cooked")]
        parts.append(f"{rng.choice(adjs or (POS_ATTR if polarity else NEG_ATTR))} {rng.choice(aspect.nouns)}")
    if len(parts) == 1:
        if rng.random() < 0.5:
            return f"{_intens(rng, rng.choice(POS_ATTR if polarity else NEG_ATTR))} {rng.choice(domain.subjects)}"
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def event_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """A concrete experience ("It stopped working after a week")."""
    return _fill(rng, _pick(rng, domain.pos_events, domain.neg_events, polarity), domain).rstrip(".")


def opinion_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """"I really enjoyed this film" style clause."""
    verb = _pick(rng, POS_OPINION, NEG_OPINION, polarity)
    obj = rng.choice((f"this {rng.choice(domain.subjects)}", f"this {rng.choice(domain.subjects)}", "it"))
    who = "We" if rng.random() < 0.2 else "I"
    if who == "We":
        verb = verb.replace("am ", "are ")
    return f"{who} {verb} {obj}"


def feeling_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """"I'm so disappointed with this hotel" style clause."""
    feel = _pick(rng, POS_FEEL, NEG_FEEL, polarity)
    obj = rng.choice((f"this {rng.choice(domain.subjects)}", "it", "the whole experience", "my purchase"))
    lead = rng.choice(("I'm", "I was", "We were", "I am", "I'm honestly"))
    word, _, rest = feel.partition(" ")
    if rest.split()[0] in {"with", "by", "about", "for"} and lead != "I'm honestly":
        feel = f"{_intens(rng, word)} {rest}"
    return f"{lead} {feel} {obj}"


def verdict_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """Whole-item verdicts ("Best hotel we've ever stayed at")."""
    return _fill(rng, _pick(rng, domain.pos_verdicts, domain.neg_verdicts, polarity), domain).rstrip(".")


def negated_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """Negation flips polarity: "not great" is NEGATIVE, "never crowded" POSITIVE."""
    aspect = rng.choice(domain.aspects)
    noun = rng.choice(aspect.nouns)
    was = _was(rng, aspect.plural)
    neg_was = {"was": "wasn't", "is": "isn't", "were": "weren't", "are": "aren't"}[was]
    if polarity == NEGATIVE:
        adj = rng.choice(aspect.pos + _t("good|great|nice|impressive|worth it|anything special|up to standard"))
        form = rng.choice(
            (
                f"The {noun} {neg_was} {adj}",
                f"The {noun} {neg_was} {adj} at all",
                f"The {noun} {was} not {adj} in the slightest",
                f"The {noun} {was} far from {adj}",
                f"The {noun} {was} anything but {adj}",
                f"Not {adj} at all",
                f"I wouldn't call the {noun} {adj}",
                f"This {rng.choice(domain.subjects)} is not worth the money",
                f"I can't say I enjoyed this {rng.choice(domain.subjects)}",
                f"Nothing about the {noun} was {adj}",
            )
        )
    else:
        adj = rng.choice(aspect.neg)
        form = rng.choice(
            (
                f"The {noun} {was} never {adj}",
                f"No complaints about the {noun}",
                f"I have nothing bad to say about the {noun}",
                f"I couldn't be happier with this {rng.choice(domain.subjects)}",
                f"Not a single problem with the {noun}",
                f"I can't fault the {noun}",
                f"Honestly can't find anything wrong with this {rng.choice(domain.subjects)}",
                f"There wasn't one thing I disliked about this {rng.choice(domain.subjects)}",
            )
        )
    return form


def comparison_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """Comparative judgements ("Far better than my old one")."""
    ref = rng.choice(COMPARE_REFS)
    if polarity == POSITIVE:
        form = rng.choice(
            ("Much better than {r}", "Way better than {r}", "Far better than {r}",
             "So much better than {r}", "Even better than {r}", "It beats {r} easily",
             "It blows {r} out of the water", "Better in every way than {r}")
        )
    else:
        form = rng.choice(
            ("Much worse than {r}", "Way worse than {r}", "Not nearly as good as {r}",
             "Nowhere near as good as {r}", "A big step down from {r}", "Far worse than {r}",
             "Nothing like {r}", "It can't compete with {r}")
        )
    return form.format(r=ref)


def rating_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """Star ratings and scores, common at the start or end of reviews."""
    if polarity == POSITIVE:
        return rng.choice(
            ("5 stars", "Five stars", "5/5", "10/10", "Ten out of ten", "Five out of five",
             "4.5 stars", "Five stars all the way", "Solid 5 stars", "9/10")
        )
    return rng.choice(
        ("1 star", "One star", "1/5", "0/10", "Zero out of ten", "One out of five",
         "Half a star", "Zero stars", "2/10", "One star and that's generous")
    )


_MAIN_BUILDERS: tuple[tuple[Builder, int], ...] = (
    (aspect_clause, 6),
    (subject_clause, 3),
    (noun_phrase, 3),
    (event_clause, 6),
    (opinion_clause, 3),
    (feeling_clause, 2),
    (verdict_clause, 2),
    (negated_clause, 3),
    (comparison_clause, 1),
)
_BUILDERS = tuple(b for b, _ in _MAIN_BUILDERS)
_WEIGHTS = tuple(w for _, w in _MAIN_BUILDERS)


def _clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    builder = rng.choices(_BUILDERS, weights=_WEIGHTS, k=1)[0]
    return builder(rng, domain, polarity)


def _lower_first(text: str) -> str:
    if len(text) > 1 and text[0].isupper() and not text[1].isupper() and not text.startswith("I "):
        return text[0].lower() + text[1:]
    return text


def _end(rng: random.Random, clause: str) -> str:
    return clause + rng.choices((".", "!", "", "..."), weights=(8, 2, 1, 0.3), k=1)[0]


def _sentence(rng: random.Random, domain: Domain, polarity: int) -> str:
    return _end(rng, _clause(rng, domain, polarity))


def make_review(rng: random.Random, polarity: int) -> str:
    """Compose one review of the given polarity from one of several shapes."""
    domain = rng.choice(DOMAINS)
    shape = rng.choices(
        ("single", "and", "contrast", "contrast_rev", "multi", "closer", "rating", "closer_only"),
        weights=(30, 12, 10, 4, 14, 14, 4, 3),
        k=1,
    )[0]
    if shape == "single":
        return _sentence(rng, domain, polarity)
    if shape == "and":
        a, b = _clause(rng, domain, polarity), _clause(rng, domain, polarity)
        joiner = rng.choice((" and ", ", and ", ", ", " and ", "; "))
        return _end(rng, a + joiner + _lower_first(b))
    if shape == "contrast":
        mild = MILD_NEG if polarity == POSITIVE else MILD_POS
        first = rng.choice(mild)
        first = first[0].upper() + first[1:]
        return _end(rng, f"{first}, but {_lower_first(_clause(rng, domain, polarity))}")
    if shape == "contrast_rev":
        mild = MILD_NEG if polarity == POSITIVE else MILD_POS
        lead = rng.choice(("Although", "Even though", "While", "Sure,"))
        return _end(rng, f"{lead} {rng.choice(mild)}, {_lower_first(_clause(rng, domain, polarity))}")
    if shape == "multi":
        n = rng.choice((2, 2, 3))
        return " ".join(_sentence(rng, domain, polarity) for _ in range(n))
    if shape == "closer":
        closer = rng.choice(POS_CLOSERS if polarity == POSITIVE else NEG_CLOSERS)
        return f"{_sentence(rng, domain, polarity)} {closer}"
    if shape == "rating":
        return f"{_end(rng, rating_clause(rng, domain, polarity))} {_sentence(rng, domain, polarity)}"
    return rng.choice(POS_CLOSERS if polarity == POSITIVE else NEG_CLOSERS)


def generate_examples(n: int, seed: int) -> list[Example]:
    """Return ``n`` unique, label-balanced examples; a pure function of ``(n, seed)``.

    Duplicates are skipped so that frequent short templates do not dominate
    training. Labels alternate so both classes are exactly balanced.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > n * 50:
            raise RuntimeError(f"could only generate {len(out)} unique examples, asked for {n}")
        polarity = len(out) % 2
        text = " ".join(make_review(rng, polarity).split())
        key = text.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(Example(text, polarity))
    rng.shuffle(out)
    return out
