"""Write the bike-shop dataset: data/train.jsonl and data/eval.jsonl (OpenAI chat fine-tuning format).

The customer service of "Ridgeway Cycles", a fictional bicycle shop: opening hours, workshop and repairs,
warranty, rentals, delivery, sizes and payment. Every fact (prices, days, addresses, brands) is made up, so
a base model cannot know the answers and a fine-tune must learn them. Built exactly like the support-bot set
by ../_qa_data.py: one canonical answer and ten user questions per intent, one or two held out for eval,
style variants and about 10% two-turn chats in train.

Deterministic (seeded); run by hand from anywhere:  python recipes/bike-shop/make_data.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qa_data)

SYSTEM_PROMPT = ("You are the customer service assistant for Ridgeway Cycles, a bicycle shop. "
                 "Answer briefly and accurately.")
# Words that keep their capital letter when a greeting is put in front of a question.
NAMES = ("Ridgeway", "Alder", "Kestrel")

# (intent, canonical answer, user questions). Answers stay short and concrete so a small model can learn them.
INTENTS: list[tuple[str, str, list[str]]] = [
    ("opening_hours",
     "We are open Tuesday to Friday 9:00 to 18:00 and Saturday 9:00 to 16:00. We are closed on Sundays and "
     "Mondays.",
     ["What are your opening hours?", "When are you open?", "opening hours", "Are you open on Sunday?",
      "What time do you close on Saturday?", "Are you open on Mondays?", "what time do you open tomorow",
      "Can I come by after work on Friday?", "Is the shop open at the weekend?", "hours"]),
    ("location_parking",
     "We are at 42 Mill Lane, next to the railway station. There are 4 free customer parking spaces behind "
     "the shop and bike racks at the front.",
     ["Where is the shop?", "What is your address?", "location", "Is there parking?", "How do I find you?",
      "Can I park my car at the shop?", "where are you located", "Are you near the train station?",
      "Is there somewhere to lock my bike outside?", "directions to the store please"]),
    ("service_prices",
     "A Basic service costs $59 and a Full service $129, parts extra. The Full service adds a drivetrain "
     "strip and clean, bearing checks and wheel truing.",
     ["How much is a service?", "What does a bike service cost?", "service price",
      "What's the difference between the Basic and Full service?", "How much is a tune-up?",
      "Are parts included in the service price?", "what does the full service include",
      "Do you do a cheap basic service?", "price list for the workshop", "how much for a servcie"]),
    ("book_repair",
     "Book online at ridgewaycycles.example/workshop or call 555-0142. Most services take 3 working days; "
     "walk-ins get a free check and a quote the same day.",
     ["How do I book a repair?", "Can I book my bike in for a service?", "book repair",
      "Do I need an appointment for the workshop?", "How long does a service take?",
      "Can I just drop my bike off?", "how do i get my bike fixed",
      "Can you look at my brakes today?", "Is there a waiting list for repairs?",
      "Where do I book the workshop onlin?"]),
    ("puncture",
     "We fix punctures while you wait for $15 including a new inner tube, usually in 20 minutes. Resealing a "
     "tubeless tyre costs $25.",
     ["I have a flat tyre", "How much to fix a puncture?", "flat tire",
      "Can you fix my flat while I wait?", "How long does a puncture repair take?",
      "Do you repair tubeless tyres?", "my back wheel keeps going flat",
      "How much is a new inner tube fitted?", "puncture repair price", "Can I bring in a wheel with a "
                                                                       "flat?"]),
    ("repair_status",
     "We text you when your bike is ready. To check before then, call 555-0142 with the name on your repair "
     "ticket or see ridgewaycycles.example/status.",
     ["Is my bike ready?", "How do I check on my repair?", "repair status",
      "When will my bike be done?", "I haven't heard back about my bike", "Can I track my repair online?",
      "is my bike fixed yet", "Will you tell me when I can pick up my bike?",
      "How will I know my service is finished?", "whats the status of my repiar"]),
    ("collection_storage_fee",
     "Please collect your bike within 7 days of our text. After that we charge $5 per day for storage.",
     ["How long can I leave my bike after the repair?", "Do you charge if I pick up my bike "
                                                        "late?", "pickup deadline",
      "I can't collect my bike this week", "Is there a storage fee?", "When do I have to pick up my bike?",
      "what happens if i dont collect my bike", "Can you keep my bike until next month?",
      "How much is storage per day?", "I'm away, can my bike stay in the shop?"]),
    ("ebike_service",
     "Yes, we service e-bikes with Bosch, Shimano Steps and Bafang motors. A motor and battery diagnostic "
     "costs $45, which we deduct if you go ahead with the repair.",
     ["Do you repair e-bikes?", "Can you service my electric bike?", "ebike repair",
      "My e-bike motor stopped working", "Which e-bike motors do you work on?",
      "How much is a battery check?", "do you fix electric bikes",
      "My e-bike shows an error code", "Is the e-bike diagnostic free?", "Can you look at my Bosch motor?"]),
    ("warranty",
     "Frames of bikes bought here have a lifetime warranty for the first owner, and components 2 years. "
     "Bring the bike and your receipt and we make the claim with the maker.",
     ["What warranty do your bikes have?", "Is the frame covered by warranty?", "warranty",
      "My frame cracked, is that covered?", "How long is the warranty on parts?",
      "How do I make a warranty claim?", "my gears broke after a year, is that under waranty",
      "Does the warranty transfer if I sell my bike?", "Do I need my receipt for a warranty claim?",
      "Is there a lifetime warranty?"]),
    ("first_checkup",
     "Every new bike gets a free check-up within 3 months of purchase. Cables stretch as they bed in, so we "
     "adjust the gears and brakes then.",
     ["Is the first service free?", "Do new bikes get a free check?", "free check-up",
      "My new bike's gears are slipping", "When should I bring my new bike back?",
      "Do I pay for the first check-up?", "new bike brakes feel loose",
      "How long do I have for the free check?", "Is there free aftercare on new bikes?",
      "the gears on my new bike need adjusting"]),
    ("returns",
     "Unused accessories and clothing can be returned within 30 days with the receipt for a full refund. "
     "Bikes can be returned within 14 days if ridden less than 50 km.",
     ["What is your return policy?", "Can I return a bike?", "returns",
      "I want to return a helmet", "Can I get a refund on clothing?", "How long do I have to return "
                                                                      "something?",
      "can i give back a bike i dont like", "Do I need the receipt to return something?",
      "I rode the bike once, can I still return it?", "refund"]),
    ("rental_prices",
     "City bikes rent for $25 a day and e-bikes for $45 a day, with helmet and lock included. Bring photo "
     "ID; we hold a $200 deposit on a card.",
     ["Do you rent bikes?", "How much is bike hire?", "rental prices",
      "Can I rent an e-bike?", "What do I need to rent a bike?", "Is a helmet included with the rental?",
      "how much is the deposit for a rental", "Do you hire out city bikes?",
      "What does a day rental cost?", "rent a bike for the day"]),
    ("rental_booking",
     "Book rentals at ridgewaycycles.example/rent or in the shop. Weekend rentals must be booked by Thursday "
     "18:00, and you can cancel for free up to 24 hours before.",
     ["How do I book a rental?", "Can I reserve a bike for Saturday?", "book rental",
      "Can I cancel my rental booking?", "Do I need to book rentals in advance?",
      "Is there a cancellation fee for rentals?", "how do i reserve an ebike for the weekend",
      "When is the deadline for weekend rentals?", "Can I book a rental bike online?",
      "I need to cancle my bike hire"]),
    ("rental_return",
     "Return rentals by 17:30 on the return day. A late return costs one extra day, and a lost lock or "
     "helmet costs $30.",
     ["When do I have to bring the rental back?", "What if I return the rental bike late?", "rental return",
      "I lost the lock from my rental", "What time do rentals need to be back?",
      "Can I return a rental bike after closing?", "how much if i lose the rental helmet",
      "Is there a fee for returning late?", "Can I keep the rental an extra day?",
      "Until what time can I return the hire bike?"]),
    ("delivery",
     "We deliver assembled bikes free within 15 km of the shop, usually within 5 working days. Further away "
     "we ship the bike boxed for $49, and you fit the pedals and handlebar.",
     ["Do you deliver bikes?", "How much is delivery?", "delivery",
      "Can you ship a bike to another city?", "Is delivery free?", "How long does delivery take?",
      "do bikes come assembled", "Do I have to build the bike myself?",
      "How far do you deliver for free?", "shiping cost for a bike"]),
    ("order_tracking",
     "You get a tracking link by email when your order ships. Accessory orders placed before 14:00 on a "
     "weekday ship the same day.",
     ["Where is my order?", "How do I track my parcel?", "order tracking",
      "When will my order ship?", "I didn't get a tracking number", "Has my online order been sent?",
      "when do you post orders", "If I order today, when does it ship?",
      "My parcel hasn't arrived yet", "tracking link"]),
    ("click_collect",
     "Choose \"Collect in store\" at checkout. We email you when the order is ready, usually within 2 hours "
     "during opening hours, and keep it for 14 days.",
     ["Can I pick up my online order in the shop?", "Do you do click and collect?", "click and collect",
      "How long do you hold collection orders?", "When can I collect my order?",
      "Can I order online and collect today?", "how do i choose store pickup",
      "Is collecting in store free?", "How will I know my order is ready to collect?",
      "reserve online pick up in shop"]),
    ("frame_size",
     "Use the size guide at ridgewaycycles.example/sizes with your height and inseam, or come in for a free "
     "15-minute sizing. Riders of 165 to 175 cm usually fit a size M.",
     ["What size bike do I need?", "Which frame size is right for me?", "sizes",
      "I'm 170 cm, what size should I get?", "Do you have a size chart?", "Do you offer a free sizing?",
      "is a medium frame right for me", "Can you help me pick the right size?",
      "What size is a 172 cm rider?", "bike size guide"]),
    ("bike_fit",
     "A professional bike fit takes 90 minutes and costs $150, including saddle, cleat and handlebar "
     "adjustments. It is half price on bikes bought here in the last 6 months.",
     ["Do you do bike fits?", "How much is a bike fitting?", "bike fit",
      "My knees hurt when I ride, can you help?", "How long does a bike fit take?",
      "Is a bike fit cheaper if I bought the bike here?", "can you adjust my saddle height properly",
      "What's included in a professional fit?", "Can you set up my cleats?", "book a fitting"]),
    ("test_ride",
     "You can test-ride any bike in stock for up to 30 minutes; bring photo ID. Test rides on e-bikes and "
     "road bikes on Saturdays need booking.",
     ["Can I test ride a bike?", "Can I try a bike before buying?", "test ride",
      "How long can a test ride be?", "Do I need to book a test ride?", "Can I try an e-bike on Saturday?",
      "what do i need to bring for a test ride", "Can I take a road bike out for a spin?",
      "Is a test ride free?", "try before you buy"]),
    ("trade_in",
     "Bring your old bike in for a free valuation. We take bikes under 8 years old in part-exchange and "
     "deduct their value from the price of a new bike.",
     ["Do you take trade-ins?", "Can I part-exchange my old bike?", "trade in",
      "How much will you give me for my bike?", "Will you take my old bike when I buy a new one?",
      "Do you value used bikes?", "my bike is 10 years old, can i trade it in",
      "Can I use my old bike toward a new one?", "How old can a trade-in bike be?",
      "part exchange value"]),
    ("payment_methods",
     "We accept cash, Visa, Mastercard and Apple Pay in the shop, and cards and PayPal online. We don't "
     "accept cheques.",
     ["What payment methods do you accept?", "Can I pay by card?", "payment",
      "Do you take Apple Pay?", "Can I pay cash?", "Do you accept cheques?",
      "can i use paypal on the website", "Do you take American Express?",
      "How can I pay for a bike?", "payment options in the shop"]),
    ("finance",
     "Bikes from $500 can be paid over 12 months at 0% interest. Apply in the shop with photo ID and a bank "
     "card; the decision takes about 10 minutes.",
     ["Do you offer finance?", "Can I pay for a bike monthly?", "finance",
      "Is there 0% finance?", "How do I apply for finance?", "What's the minimum price for finance?",
      "can i spread the cost of an ebike", "How long does the finance check take?",
      "Do you have interest free credit?", "monthly payments on a bike"]),
    ("gift_cards",
     "Gift cards from $10 to $500 are sold in the shop and online. They are valid for 2 years and work for "
     "bikes, parts, repairs and rentals.",
     ["Do you sell gift cards?", "Can I buy a voucher?", "gift card",
      "How long is a gift card valid?", "Can I use a gift card for a repair?",
      "What amounts do gift cards come in?", "can i get a gift voucher online",
      "Does my gift card expire?", "Can a gift card pay for a rental?", "I want to buy a present for a "
                                                                        "cyclist"]),
    ("price_match",
     "We match the price of any local shop or major online retailer for the same new item in stock. Show us "
     "the offer on your phone at the till.",
     ["Do you price match?", "I found it cheaper online", "price match",
      "Will you match another shop's price?", "Can you beat an online price?",
      "Do you match sale prices?", "i saw this helmet cheaper somewhere else",
      "How does price matching work?", "What do I need to show for a price match?",
      "Is there a price promise?"]),
    ("kids_bikes",
     "Kids' bikes go by wheel size: 16-inch for about 4 to 6 years, 20-inch for 6 to 8 and 24-inch for 8 to "
     "11. Our Grow Back scheme refunds 30% of the price when they outgrow a bike bought here.",
     ["What size bike for a 7 year old?", "Do you sell children's bikes?", "kids bikes",
      "What is the Grow Back scheme?", "My son is 5, which bike should he get?",
      "What happens when my child outgrows the bike?", "which wheel size for my daugher",
      "Do you have 24 inch bikes?", "Is there a trade-in for kids' bikes?",
      "bike for a 10 year old"]),
    ("loyalty",
     "Ridgeway Club members collect 1 point per $1 spent and get $10 off for every 200 points. Joining is "
     "free at the till or online.",
     ["Do you have a loyalty scheme?", "How does the Ridgeway Club work?", "loyalty",
      "How do I collect points?", "How many points do I need for a discount?",
      "Is the club free to join?", "do repairs earn points",
      "How do I join the loyalty programme?", "What are my points worth?", "member discount"]),
    ("accessory_fitting",
     "We fit accessories bought here free, such as lights, racks, mudguards and bottle cages. Fitting "
     "accessories bought elsewhere costs $10 per item.",
     ["Can you fit a rack to my bike?", "Do you charge to fit accessories?", "accessory fitting",
      "Can you put mudguards on?", "Will you fit lights I bought online?", "Is fitting free?",
      "how much to fit a bottle cage", "Can you install a child seat?",
      "I bought a pannier rack elsewhere, can you fit it?", "fit my new lights please"]),
    ("winter_storage",
     "We store bikes from November to March for $60, and that includes a Basic service before you collect it "
     "in spring.",
     ["Do you store bikes over winter?", "Can I leave my bike with you for the winter?", "winter storage",
      "How much is winter storage?", "When does winter storage start?", "Is a service included with storage?",
      "i have no room for my bike in winter", "Can you keep my road bike until spring?",
      "What months does bike storage cover?", "seasonal bike storage price"]),
    ("security_marking",
     "Every new bike gets its frame number engraved and registered for free. With a new bike you also get "
     "20% off a D-lock.",
     ["How do I protect my bike from theft?", "Do you register frame numbers?", "security marking",
      "Can you engrave my bike?", "Is there a discount on locks?", "Do you keep a record of my frame number?",
      "what lock should i buy with my new bike", "Do you mark bikes against theft?",
      "Is frame marking free?", "anti theft registration"]),
    ("group_rides",
     "Our free group ride leaves the shop every Saturday at 8:00: 40 km at an easy pace with a coffee stop. "
     "Sign up at ridgewaycycles.example/rides; helmets are required.",
     ["Do you have group rides?", "Is there a shop ride?", "group rides",
      "When does the Saturday ride start?", "How long is the group ride?", "Do I need to sign up for the "
                                                                           "ride?",
      "is the group ride for beginners", "How fast is the club ride?",
      "Do I need a helmet for the group ride?", "ride with other cyclists"]),
    ("maintenance_class",
     "Our 2-hour basic maintenance class runs on the first Wednesday of each month at 18:30 and costs $35. "
     "You learn to fix a puncture, adjust brakes and clean the chain.",
     ["Do you run maintenance classes?", "Can I learn to fix my own bike?", "maintenance class",
      "When is the next bike repair course?", "How much is the workshop "
                                              "class?", "What do you learn in the class?",
      "is there a course for beginners on bike repair", "How long is the maintenance class?",
      "Can you teach me to fix a puncture?", "bike mechanic lessons"]),
    ("contact",
     "Call 555-0142 during opening hours or email help@ridgewaycycles.example; we reply within 1 working "
     "day. For repairs, ask for the workshop.",
     ["How do I contact you?", "What is your phone number?", "contact",
      "What's your email address?", "How quickly do you answer emails?", "Can I talk to the workshop?",
      "who do i call about my repair", "I need to speak to someone at the shop",
      "Is there a customer service email?", "phone numbr"]),
    ("special_order",
     "We can order any model from Alder and Kestrel, our two bike brands, in 2 to 6 weeks. A special order "
     "needs a 20% deposit, refunded if the maker cancels.",
     ["Can you order a bike that's not in stock?", "Which brands do you sell?", "special order",
      "How long does it take to order a bike?", "Do I have to pay a deposit for an order?",
      "Can I get a Kestrel in a different colour?", "do you sell alder bikes",
      "What if the maker cancels my order?", "Can you get a bike in my size?",
      "order a bike from the catalogue"]),
    ("used_bikes",
     "We sell used bikes that our mechanics have checked and serviced, with a 6-month warranty. See what is "
     "in stock at ridgewaycycles.example/used.",
     ["Do you sell second-hand bikes?", "Do you have used bikes?", "used bikes",
      "Are your used bikes checked?", "Is there a warranty on a used bike?", "Where can I see your used "
                                                                             "stock?",
      "cheap secondhand bike for commuting", "Do pre-owned bikes come serviced?",
      "How long is the used bike warranty?", "refurbished bikes"]),
    ("parts_order",
     "Parts we don't stock can usually be ordered in 2 to 4 working days. We call you when they arrive and "
     "hold them for 14 days.",
     ["Can you order a part for me?", "Do you have this part in stock?", "parts",
      "How long does it take to get a part?", "My derailleur needs a part you don't have",
      "Can you get a specific chain?", "how long will you hold my ordered part",
      "Will you call me when my part arrives?", "Do you order spare parts?",
      "I need a replacment hanger"]),
]


def make_rows() -> tuple[list[dict], list[dict]]:
    """The train and eval rows, the same on every call (seeded)."""
    return qa_data.make_rows(INTENTS, SYSTEM_PROMPT, names=NAMES)


if __name__ == "__main__":
    qa_data.write(HERE / "data", *make_rows())
