"""Write the docs-qa recipe's documents and questions: docs/ and data/train.jsonl, data/eval.jsonl.

Twenty documents of "Velmora Dynamics", a fictional maker of air purifiers and water sensors: its policies,
products and procedures, full of invented names, numbers, codes, dates and places that no model can know or
guess. Each fact is one plain sentence in exactly one document; the sentences around it carry other numbers on
purpose (distractors), so a question is only answered by the right chunk, not by any chunk with a number in
it.

Each fact has one short answer and two questions in really different words (wording A and wording B):
  - the 16 training documents: wording A -> train.jsonl, wording B -> eval.jsonl (the "known documents"
  held-out
    questions: facts the model was trained on, asked in words it never saw);
  - the 4 HOLDOUT documents (finetune.yaml's data.documents_holdout): wording A -> eval.jsonl only (the
  "unseen
    documents" questions: facts no training row holds, answerable from retrieval alone).
Rows are chats without a system message (finetune.yaml's data.system_prompt adds it), plus two keys: `source`
(the document, relative to docs/) and `quote` (the sentence of that document that holds the answer, verbatim).

The script checks its own output: every quote is in its document, every answer's key figure is in its quote,
no key figure is in a second document, no question repeats, every document is 150-400 words.

Deterministic (random.Random(0)), standard library only; run by hand from anywhere:
    python recipes/docs-qa/make_data.py
"""

from __future__ import annotations

import html
import importlib.util
import random
import re
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qa_data)

COMPANY = "Velmora Dynamics"
SYSTEM_PROMPT = f"You are the assistant of {COMPANY}. Answer the question in one sentence."

# Whole documents kept out of training: their questions are the unseen held-out set (eval.jsonl only).
# Keep in sync with finetune.yaml's data.documents_holdout.
HOLDOUT = ("repair-service.md", "data-retention.md", "loyalty-programme.html", "it-equipment.txt")


class Fact(NamedTuple):
    sentence: str   # the sentence of the document that states it (the row's quote)
    key: str        # the figure the answer hinges on: in the sentence, in the answer, in no other document
    answer: str     # one short sentence, the same for both wordings
    q_a: str        # wording A
    q_b: str        # wording B


F = Fact
# A document: file name, title, sections of (heading or None, paragraphs); a paragraph is a list of sentences,
# plain strings (context and distractors) or Facts.
Section = tuple[str | None, list[list[str | Fact]]]

DOCS: list[tuple[str, str, list[Section]]] = [
    ("returns-policy.md", "Returns Policy", [
        (None, [[
            "This policy covers every Velmora Dynamics product sold in the Northern Sales Region after 3 "
            "March 2021.",
            "Products bought before that date fall under the older policy, which the Customer Desk sends on "
            "request.",
        ]]),
        ("Return window", [[
            F("Customers may return a product within 41 days of the delivery date shown on the courier's "
              "tracking page.",
              "41 days", "You can return a product within 41 days of delivery.",
              "How long do I have to return a Velmora product?",
              "My order arrived a few weeks ago and I have changed my mind; what is the deadline for sending "
              "it back?"),
            "Products bought at a trade fair follow the same rule, but the clock starts on the day of the "
            "fair.",
            "Gift recipients may return a product too, and receive store credit instead of a refund.",
        ]]),
        ("Return authorisation", [[
            F("Every return needs a return authorisation number that starts with the letters RMA-Q followed "
              "by six digits.",
              "RMA-Q", "Return authorisation numbers start with RMA-Q followed by six digits.",
              "What format does a Velmora return authorisation number have?",
              "Which prefix should the code I get from the returns desk begin with before I ship an item "
              "back?"),
            "The number is valid for 30 days and must be written on the outside of the parcel.",
            F("Returned items must be sent to the Velmora returns depot at Unit 14, Carrow Lane, Osterwick.",
              "Unit 14, Carrow Lane", "Returns go to the depot at Unit 14, Carrow Lane, Osterwick.",
              "Where do I send a returned Velmora product?",
              "What address should I write on the parcel when I post something back to Velmora?"),
        ]]),
        ("Refunds and fees", [[
            F("Refunds are issued within 17 business days after the returns depot has inspected the item.",
              "17 business days", "Refunds are issued within 17 business days of the item's inspection.",
              "How long does it take to get a refund from Velmora?",
              "Once the depot has checked the item I sent back, when will I see my money again?"),
            "Inspection itself normally takes 2 to 4 working days, and a card refund can take a further 5 "
            "days to appear on a statement.",
        ], [
            F("Opened products returned without their original packaging carry a restocking fee of 13 "
              "percent of the purchase price.",
              "13 percent", "The restocking fee is 13 percent of the purchase price.",
              "What restocking fee does Velmora charge on returns?",
              "I threw away the box of a purifier I opened; how much will be deducted if I send it back?"),
            "Items returned with their packaging intact carry no fee.",
        ]]),
        ("Items that cannot be returned", [[
            F("Replacement filter cartridges cannot be returned once their foil seal has been broken.",
              "foil seal", "Filter cartridges cannot be returned once their foil seal is broken.",
              "Can I return a filter cartridge after opening it?",
              "I peeled the wrapper off a spare filter but turned out not to need it; will Velmora take it "
              "back?"),
            "Custom-engraved units and calibration kits bought under a service contract are excluded as "
            "well.",
        ]]),
    ]),
    ("warranty.md", "Product Warranty", [
        (None, [[
            "Velmora Dynamics warrants its hardware against defects in materials and workmanship.",
            "This document sets out the terms that apply to every product in the 2023 catalogue and later "
            "ones.",
        ]]),
        ("Warranty periods", [[
            F("Aerolith air purifiers carry a warranty of 38 months from the date of purchase.",
              "38 months", "Aerolith air purifiers are under warranty for 38 months from purchase.",
              "How long is the warranty on an Aerolith air purifier?",
              "My Aerolith stopped working and it is nearly three years old; for how long after buying is it "
              "covered?"),
            F("Hydrasent water sensors carry a shorter warranty of 19 months, because their probes wear with "
              "use.",
              "19 months", "Hydrasent water sensors are under warranty for 19 months.",
              "What is the warranty period for Hydrasent water sensors?",
              "For how long after purchase will Velmora fix a faulty Hydrasent for free?"),
            "Accessories such as wall brackets and power adapters are covered for 12 months, and refurbished "
            "units for half the period of the new product.",
        ]]),
        ("Extended cover", [[
            F("Customers can extend the warranty by registering the product on the Velmora portal within 23 "
              "days of purchase.",
              "23 days", "You must register the product within 23 days of purchase to extend the warranty.",
              "How soon after buying must I register my product to get the extended warranty?",
              "Is there a deadline for signing up on the Velmora portal if I want longer cover for my "
              "device?"),
            "Registered products receive an extra year of cover and are handled first at the repair depot.",
            F("The paid extension plan, CareLine Plus, costs 29 euros per year for each device.",
              "29 euros", "CareLine Plus costs 29 euros per year for each device.",
              "How much does CareLine Plus cost?",
              "What would I pay annually to put one of my devices on Velmora's paid extension plan?"),
        ]]),
        ("Making a claim", [[
            F("Warranty claims must quote the serial number, which is printed on a silver label under the "
              "device's base.",
              "silver label", "The serial number is on a silver label under the device's base.",
              "Where do I find the serial number for a warranty claim?",
              "Which part of my unit should I look at to read off the number the claim form asks for?"),
            "Claims are acknowledged within 48 hours and most are decided within 10 working days.",
        ]]),
        ("Exclusions", [[
            F("The warranty is void if the device has been opened by anyone other than a certified "
              "technician holding a Grade V4 badge.",
              "Grade V4", "Only a certified technician with a Grade V4 badge may open the device without "
                          "voiding the warranty.",
              "Who may open a Velmora device without voiding the warranty?",
              "Can any repair shop take the casing off my purifier, or does it need someone with a "
              "particular qualification?"),
            "Damage from floods, power surges above 260 volts or outdoor use is not covered either.",
        ]]),
    ]),
    ("aerolith-range.md", "The Aerolith Air Purifier Range", [
        (None, [[
            "Aerolith is the Velmora range of room air purifiers, first sold in 2016 and redesigned in 2022.",
            "Three models are on sale; they differ in room size, fan noise and filter stack.",
            "The AL-220 costs 289 euros and the AL-360 costs 459 euros.",
        ]]),
        ("Aerolith AL-220", [[
            "The AL-220 is the smallest model, meant for bedrooms and home offices.",
            F("The AL-220 is rated for rooms of up to 27 square metres.",
              "27 square metres", "The AL-220 is rated for rooms of up to 27 square metres.",
              "What room size is the Aerolith AL-220 rated for?",
              "How big a room can an AL-220 purify before it stops keeping up?"),
            "It weighs 4.1 kilograms and uses a single combined filter.",
        ]]),
        ("Aerolith AL-360", [[
            "The AL-360 is the mid-range model and the best seller since 2019.",
            F("The AL-360 runs at 31 decibels on its night setting.",
              "31 decibels", "The AL-360 runs at 31 decibels on its night setting.",
              "How loud is the AL-360 on its night setting?",
              "I am a light sleeper; how much noise will an AL-360 make in my bedroom overnight?"),
            "On its highest setting it reaches 54 decibels and moves 410 cubic metres of air per hour.",
            F("The AL-360 uses the blue-ringed filter cartridge with part number FC-0362.",
              "FC-0362", "The AL-360 uses filter cartridge FC-0362.",
              "Which filter cartridge fits the AL-360?",
              "I need a new filter for my AL-360; what part number do I order?"),
        ]]),
        ("Aerolith AL-590", [[
            "The AL-590 is the largest model, built for open-plan offices, clinics and classrooms.",
            F("The AL-590 is the only Aerolith model with a built-in humidity sensor, added at the request "
              "of the hospital chain Marrowfield Care.",
              "Marrowfield Care", "The AL-590's humidity sensor was added at the request of Marrowfield "
                                  "Care.",
              "Which customer asked for the AL-590's humidity sensor?",
              "Why does the AL-590 measure humidity when the smaller purifiers don't; who wanted that?"),
            F("The AL-590 costs 749 euros including VAT.",
              "749 euros", "The AL-590 costs 749 euros including VAT.",
              "What is the price of the Aerolith AL-590?",
              "If I buy the biggest Aerolith for our clinic, what will it cost us with tax?"),
        ]]),
        ("Filters", [[
            F("Aerolith filters should be replaced every 2,300 operating hours, and the display shows an "
              "amber leaf icon when a change is due.",
              "2,300 operating hours", "Aerolith filters should be replaced every 2,300 operating hours.",
              "How often should Aerolith filters be replaced?",
              "After how much running time does the filter in my purifier need swapping?"),
        ]]),
    ]),
    ("hydrasent-sensors.html", "Hydrasent Water-Quality Sensors", [
        (None, [[
            "Hydrasent sensors measure water quality in tanks, pipes and cooling loops.",
            "They report to the Velmora Hub over the Velmora Mesh radio link, and a single Hub serves up to "
            "64 sensors.",
        ]]),
        ("Models", [[
            F("The Hydrasent HS-31 measures acidity and temperature and runs for 14 months on one lithium "
              "cell.",
              "14 months", "The HS-31 runs for 14 months on one lithium cell.",
              "How long does the HS-31's battery last?",
              "How often will I have to put a fresh cell in a Hydrasent HS-31?"),
            F("The Hydrasent HS-47 adds a chlorine probe and is certified to a depth of 6.5 metres.",
              "6.5 metres", "The HS-47 is certified to a depth of 6.5 metres.",
              "To what depth is the HS-47 certified?",
              "How far down into a tank can I lower an HS-47 and stay within its rating?"),
            "The HS-31 is certified to 2 metres, and both models weigh under 300 grams.",
        ]]),
        ("Connectivity", [[
            F("Hydrasent sensors report a reading every 11 minutes by default.",
              "11 minutes", "Hydrasent sensors report a reading every 11 minutes by default.",
              "How often does a Hydrasent sensor send a reading?",
              "If I leave the settings alone, how much time passes between two measurements from my water "
              "sensor?"),
            "The interval can be set anywhere from 1 to 60 minutes, and shorter intervals drain the cell "
            "faster.",
            F("The Velmora Mesh radio link uses the 868.3 MHz band in Europe.",
              "868.3 MHz", "Velmora Mesh uses the 868.3 MHz band in Europe.",
              "Which radio frequency does Velmora Mesh use in Europe?",
              "On what band do the sensors at a European site transmit to their Hub?"),
            "Range is about 400 metres in open ground and 60 metres through two concrete walls.",
        ]]),
        ("Alarms", [[
            F("A Hydrasent raises an alarm when chlorine rises above 4.2 milligrams per litre.",
              "4.2 milligrams per litre", "The alarm is raised when chlorine rises above 4.2 milligrams per "
                                          "litre.",
              "At what chlorine level does a Hydrasent raise an alarm?",
              "How much chlorine has to be in the water before the sensor warns me?"),
            "Acidity alarms trigger below pH 6 or above pH 9 unless the site sets its own limits.",
            F("Alarm texts are sent from the short number 60417.",
              "60417", "Alarm texts come from the short number 60417.",
              "Which number do Hydrasent alarm text messages come from?",
              "I got an SMS about my water sensor; what sender should a genuine Velmora alert show?"),
        ]]),
    ]),
    ("shipping.md", "Shipping and Delivery", [
        (None, [[
            "Velmora ships from its warehouse at Pellvar Bay to every address in the country and to selected "
            "islands.",
            "The warehouse closes for 12 days over the midwinter holiday.",
        ]]),
        ("Dispatch", [[
            F("Orders placed before 14:30 Osterwick time leave the warehouse on the same working day.",
              "14:30", "Orders placed before 14:30 Osterwick time leave the warehouse the same working day.",
              "What is the cutoff time for same-day dispatch?",
              "By what time today do I need to order so my parcel goes out today?"),
            "Orders placed later, or at weekends, leave on the next working day.",
            "Pallet orders such as a batch of AL-590 units leave within 2 working days and need a delivery "
            "slot booked on the portal.",
            F("Tracking numbers for standard deliveries begin with the letters VDL and have eleven "
              "characters.",
              "VDL", "Standard delivery tracking numbers begin with VDL.",
              "How do Velmora standard delivery tracking numbers start?",
              "What letters should I see at the front of the code I use to follow my standard parcel?"),
        ]]),
        ("Costs", [[
            F("Standard delivery is free on orders over 85 euros.",
              "85 euros", "Standard delivery is free on orders over 85 euros.",
              "What's the minimum order value for free delivery?",
              "How much do I have to spend before Velmora stops charging me for normal shipping?"),
            "Below that, standard delivery costs 6.90 euros and express delivery costs 14.50 euros.",
            F("Express deliveries are carried by the courier firm Talbrook Freight.",
              "Talbrook Freight", "Express deliveries are carried by Talbrook Freight.",
              "Which courier handles Velmora's express deliveries?",
              "If I pay extra for the faster option, which company brings my parcel?"),
        ]]),
        ("Islands and missed deliveries", [[
            F("Deliveries to the Isle of Quenby take 3 extra working days because parcels cross on the "
              "Tuesday ferry.",
              "3 extra working days", "Deliveries to the Isle of Quenby take 3 extra working days.",
              "How much longer does delivery to the Isle of Quenby take?",
              "I live on Quenby; how many more days than the mainland should I expect to wait for my order?"),
            "Pallet deliveries to the islands are not offered, and orders heavier than 30 kilograms travel "
            "on the Friday ferry only.",
        ], [
            "The courier makes two delivery attempts and leaves a card each time.",
            F("Parcels that cannot be delivered are held at the courier depot for 8 calendar days before "
              "they return to Velmora.",
              "8 calendar days", "Undelivered parcels are held at the courier depot for 8 calendar days.",
              "How long does the courier depot keep a parcel it could not deliver?",
              "I was out when the courier came twice; how long do I have to collect the parcel before it "
              "goes back?"),
        ]]),
    ]),
    ("support-escalation.md", "Support Escalation Procedure", [
        (None, [[
            "This procedure is for the customer support team and applies to every ticket, whatever the "
            "channel.",
            "Tier 1 agents send a first reply within 4 hours and update the customer at least once every 24 "
            "hours.",
        ]]),
        ("When to escalate", [[
            F("A ticket that is not resolved within 36 hours of opening must be escalated to Tier 2.",
              "36 hours", "A ticket not resolved within 36 hours must be escalated to Tier 2.",
              "When must a support ticket be escalated to Tier 2?",
              "How long can a Tier 1 agent keep an unsolved case before handing it up?"),
            F("Tickets are escalated by adding the tag ESC-7 in the ticket system.",
              "ESC-7", "Tickets are escalated by adding the tag ESC-7.",
              "Which tag do I add to a ticket to escalate it?",
              "In the ticket system, how do I mark a case so that it moves to the next tier?"),
        ]]),
        ("Tier 2 and Tier 3", [[
            F("Tier 2 is led by Oriane Falkenrath, who also approves any goodwill credit above 150 euros.",
              "Oriane Falkenrath", "Tier 2 is led by Oriane Falkenrath.",
              "Who leads Tier 2 support?",
              "Which person is in charge of the team that takes over escalated tickets?"),
            "Credits up to 40 euros can be granted by any agent.",
            F("Tier 3 engineering accepts escalations only between 07:00 and 19:00 on weekdays.",
              "07:00 and 19:00", "Tier 3 accepts escalations between 07:00 and 19:00 on weekdays.",
              "When does Tier 3 engineering accept escalations?",
              "At what times of day can I hand a ticket on to the engineers?"),
        ]]),
        ("P1 incidents", [[
            "A ticket is P1 when a customer's entire site has lost monitoring, and P2 when a single device "
            "is down.",
            F("A P1 incident must be reported to the duty manager by phone on extension 4471.",
              "extension 4471", "P1 incidents are reported to the duty manager on extension 4471.",
              "Which extension do I call to report a P1 incident?",
              "A customer's whole site has gone dark; what number do I ring to reach the duty manager?"),
        ]]),
        ("Closing", [[
            F("Every escalated ticket gets a follow-up call from the customer care team 6 days after it is "
              "closed.",
              "6 days", "Customer care calls 6 days after an escalated ticket is closed.",
              "When does customer care follow up on an escalated ticket?",
              "How soon after an escalated case is closed does somebody phone the customer back?"),
            "Satisfaction scores below 3 out of 5 are reviewed at the weekly team meeting.",
        ]]),
    ]),
    ("security-policy.md", "Information Security Policy", [
        (None, [[
            "This policy applies to every employee, contractor and visitor who uses Velmora systems or data.",
            "It is reviewed every spring and was last approved by the board in April 2024.",
        ]]),
        ("Ownership", [[
            F("The Chief Information Security Officer is Ysolde Brannagh.",
              "Ysolde Brannagh", "The Chief Information Security Officer is Ysolde Brannagh.",
              "Who is Velmora's Chief Information Security Officer?",
              "Which person is ultimately responsible for information security at the company?"),
            "Each department also names a security contact, who attends a briefing every 3 months.",
        ]]),
        ("Passwords and devices", [[
            F("Passwords for Velmora systems must be at least 15 characters long.",
              "15 characters", "Passwords must be at least 15 characters long.",
              "What is the minimum password length at Velmora?",
              "How short can my password for company systems be before it is rejected?"),
            "They must not repeat any of the previous 10 passwords, and accounts lock after 5 failed "
            "attempts.",
            F("Staff laptops lock the screen automatically after 7 minutes without input.",
              "7 minutes", "Laptops lock the screen after 7 minutes without input.",
              "After how long does a staff laptop screen lock itself?",
              "If I walk away from my work computer, how soon will it lock?"),
            F("USB storage devices may only be used if they are encrypted models from the approved list "
              "VX-SEC-12.",
              "VX-SEC-12", "Only encrypted USB devices from the approved list VX-SEC-12 may be used.",
              "Which USB storage devices may staff use?",
              "Can I plug any memory stick into my work laptop, or is there a list I have to check?"),
        ]]),
        ("Classification and access", [[
            F("Data is classified at four levels, and the highest level is called Amber-Sealed.",
              "Amber-Sealed", "The highest data classification level is Amber-Sealed.",
              "What is the highest data classification level at Velmora?",
              "Which label marks the company's most sensitive information?"),
            "The other three levels are Public, Internal and Restricted.",
            "Restricted data may be shared with partners under a signed agreement, but Amber-Sealed data "
            "never leaves company systems.",
            "Visitors receive a paper badge valid for one day and must be escorted at all times.",
            F("Access badges expire after 13 months and are renewed at the facilities office.",
              "13 months", "Access badges expire after 13 months.",
              "How long is an access badge valid?",
              "When will my building pass stop working and need renewing?"),
        ]]),
    ]),
    ("travel-expenses.txt", "Travel and Expenses Policy", [
        (None, [[
            "This policy explains what Velmora Dynamics pays for when employees travel on company business.",
            "It applies from 1 January 2024 and replaces the policy of 2019.",
        ]]),
        ("Booking", [[
            F("All travel must be booked through the agency Corbel and Finch Travel.",
              "Corbel and Finch", "Travel is booked through Corbel and Finch Travel.",
              "Which travel agency does Velmora use?",
              "Who do I contact to arrange flights and hotels for a business trip?"),
            "Trips abroad also need written approval from a director at least 10 days before departure.",
            F("Flights longer than 7.5 hours may be booked in premium economy.",
              "7.5 hours", "Flights longer than 7.5 hours may be booked in premium economy.",
              "When may I fly premium economy?",
              "How long does a flight have to be before I am allowed a seat better than economy?"),
            "Business class is never reimbursed, and train travel is preferred for trips under 4 hours.",
        ]]),
        ("Hotels and meals", [[
            F("Hotel costs are reimbursed up to 142 euros per night in Osterwick and other Tier A cities.",
              "142 euros", "Hotels are reimbursed up to 142 euros per night in Tier A cities.",
              "What is the hotel limit per night in Tier A cities?",
              "How much can I spend on a room per night when I stay over in Osterwick for work?"),
            "The limit is 110 euros per night elsewhere.",
            F("The daily meal allowance is 37 euros.",
              "37 euros", "The daily meal allowance is 37 euros.",
              "How much is the daily meal allowance?",
              "What can I claim for food for one day while I am travelling for the company?"),
            "Alcohol is not reimbursed, and meals provided by a conference are deducted from the allowance.",
        ]]),
        ("Cars and claims", [[
            F("Private car use is reimbursed at 0.31 euros per kilometre.",
              "0.31 euros", "Private car use is reimbursed at 0.31 euros per kilometre.",
              "What is the mileage rate for using my own car?",
              "If I drive my own vehicle to a client, how much do I get back for each kilometre?"),
            "Parking and tolls are paid in full with a receipt.",
            F("Expense claims must be submitted within 26 days of the end of the trip.",
              "26 days", "Expense claims must be submitted within 26 days of the end of the trip.",
              "What is the deadline for submitting an expense claim?",
              "I got back from a business trip last week; how long do I have to hand in my receipts?"),
        ]]),
    ]),
    ("onboarding.md", "New Starter Onboarding", [
        (None, [[
            "Welcome to Velmora Dynamics.",
            "This guide explains what happens in your first weeks, whichever office you join.",
        ]]),
        ("Your first week", [[
            F("New starters attend the induction day, called Foundation Day, on the first Wednesday of their "
              "employment.",
              "first Wednesday", "New starters attend Foundation Day on the first Wednesday of their "
                                 "employment.",
              "When is the induction day for new employees?",
              "On which day of my first week do I go to Foundation Day?"),
            "Foundation Day starts at 9:15 in the head office auditorium and ends with a tour of the test "
            "lab.",
            F("The welcome pack includes a canteen card loaded with 35 euros.",
              "35 euros", "The welcome pack includes a canteen card loaded with 35 euros.",
              "How much credit is on the canteen card in the welcome pack?",
              "What is the value of the food card new employees are given?"),
        ]]),
        ("Training and support", [[
            F("Each new starter is paired with a buddy for the first 53 days.",
              "53 days", "New starters have a buddy for their first 53 days.",
              "How long does the buddy scheme last for new starters?",
              "For how many days will I have a colleague assigned to help me settle in?"),
            F("New starters must complete the security course SEC-101 within their first 10 working days.",
              "SEC-101", "New starters must complete the security course SEC-101.",
              "Which security course must new starters complete?",
              "What is the code of the mandatory security training I have to finish in my first fortnight?"),
            "Team-specific courses follow in the second month, and engineers also attend a 3-day product "
            "school in the test lab.",
            "Your manager books a check-in with you at the end of weeks 2, 4 and 8.",
        ]]),
        ("Probation and pay", [[
            F("The probation period lasts 7 months.",
              "7 months", "The probation period lasts 7 months.",
              "How long is the probation period at Velmora?",
              "When will I stop being on probation after I join?"),
            "A review meeting takes place halfway through, and notice during probation is 2 weeks.",
            F("Payroll questions go to the people team lead, Corin Attwater.",
              "Corin Attwater", "Payroll questions go to Corin Attwater.",
              "Who handles payroll questions?",
              "My first payslip looks wrong; whom should I ask about it?"),
        ]]),
    ]),
    ("office-locations.md", "Office Locations", [
        (None, [[
            "Velmora Dynamics has five sites, and about 1,100 of its staff work at them.",
            "Each site has a reception desk open from 8:00 to 18:00 on working days.",
        ]]),
        ("Head office", [[
            F("The head office is at 9 Quillon Street, Osterwick.",
              "9 Quillon Street", "The head office is at 9 Quillon Street, Osterwick.",
              "What is the address of Velmora's head office?",
              "Where do I go if I have a meeting at company headquarters?"),
            F("Visitors to head office should use the entrance on Maddock Row, as the main door on Quillon "
              "Street is for staff only.",
              "Maddock Row", "Visitors to head office use the entrance on Maddock Row.",
              "Which entrance should visitors use at head office?",
              "I'm visiting headquarters for the first time; which door do I go in by?"),
            "The building has 6 floors and visitor parking for 20 cars, and the canteen on the ground floor "
            "is open to guests.",
            "Meeting rooms are booked through reception at least 24 hours ahead.",
        ]]),
        ("Other sites", [[
            F("The research centre is in Lunmouth, on the old harbour front, and employs about 212 people.",
              "Lunmouth", "The research centre is in Lunmouth.",
              "Where is Velmora's research centre?",
              "In which town do Velmora's researchers and lab engineers work?"),
            F("The Calder Reach office houses the customer support team.",
              "Calder Reach", "The customer support team is in the Calder Reach office.",
              "Which office houses the customer support team?",
              "If I phone customer support, which town are the people answering based in?"),
            "Calder Reach also hosts the training rooms used for installer courses, which run every second "
            "month for groups of up to 16 people.",
            F("The Pellvar Bay warehouse has 14 loading docks and runs two shifts a day.",
              "14 loading docks", "The Pellvar Bay warehouse has 14 loading docks.",
              "How many loading docks does the Pellvar Bay warehouse have?",
              "How many lorries can be loaded at once at the company's warehouse?"),
            F("The sales office in Sankt Orvid is the company's only office outside the country.",
              "Sankt Orvid", "Velmora's only office abroad is the sales office in Sankt Orvid.",
              "Where is Velmora's only office abroad?",
              "Does Velmora have any premises in another country, and if so where?"),
        ]]),
    ]),
    ("product-codes.txt", "Product Code Reference", [
        (None, [[
            "This reference explains how Velmora product codes are built, for staff in sales, support and "
            "the warehouse.",
            "Codes appear on invoices, on the box label and in the ticket system.",
        ]]),
        ("Structure", [[
            F("Every product code has the form VX-NNNN, where the first digit gives the product family.",
              "VX-NNNN", "Product codes have the form VX-NNNN, the first digit giving the family.",
              "What format do Velmora product codes have?",
              "How is a product number like the ones on Velmora invoices put together?"),
            F("The suffix R marks a refurbished unit, for example VX-4471R.",
              "suffix R", "The suffix R marks a refurbished unit.",
              "What does the letter R at the end of a product code mean?",
              "My invoice shows a product number ending in an extra letter; what does that tell me about the "
              "unit?"),
            "The suffix D marks a demonstration unit and is never sold to customers.",
        ]]),
        ("Families", [[
            "Codes starting VX-4 belong to the Aerolith family.",
            F("Codes starting VX-7 belong to the Hydrasent family.",
              "VX-7", "Codes starting VX-7 belong to the Hydrasent family.",
              "Which product family do codes starting VX-7 belong to?",
              "A box in the warehouse carries a code that begins with VX-7; what kind of product is inside?"),
            F("Codes VX-9000 to VX-9099 are reserved for spare parts sold only to certified technicians.",
              "VX-9000 to VX-9099", "Codes VX-9000 to VX-9099 are reserved for spare parts for certified "
                                    "technicians.",
              "Which product codes are reserved for spare parts?",
              "What range of codes is kept for the components that only certified technicians may buy?"),
        ]]),
        ("Common codes", [[
            "VX-4220 is the AL-220 in white, VX-4360 is the AL-360 in white and VX-4590 is the AL-590.",
            F("VX-4471 is the code for the AL-360 in graphite grey.",
              "VX-4471", "VX-4471 is the AL-360 in graphite grey.",
              "What product is VX-4471?",
              "Which purifier and colour should I pick from the shelf when an order says VX-4471?"),
            "VX-7031 is the HS-31 sensor, and VX-7047 is the HS-47 sold without the chlorine kit.",
            "Filter cartridges have their own codes starting FC, such as FC-0220 for the AL-220.",
            F("VX-7318 is the HS-47 chlorine sensor kit.",
              "VX-7318", "VX-7318 is the HS-47 chlorine sensor kit.",
              "What is VX-7318?",
              "Which item does a customer get when they order the product numbered VX-7318?"),
        ]]),
    ]),
    ("repair-service.md", "Repair Service", [
        (None, [[
            "Velmora repairs its own products, in and out of warranty, for customers and for installers.",
            "Repairs under warranty are free; this page is mostly about repairs the customer pays for.",
        ]]),
        ("Where and how", [[
            F("Repairs are carried out at the repair depot in Brenholt.",
              "Brenholt", "Repairs are carried out at the depot in Brenholt.",
              "Where does Velmora carry out repairs?",
              "When I send my broken purifier away, which town does it go to?"),
            F("A courier collection for a repair can be booked by calling 0800 553 219.",
              "0800 553 219", "Repair collections are booked by calling 0800 553 219.",
              "What number do I call to book a repair collection?",
              "How do I get a courier to pick up my faulty device for repair?"),
            "Collections are made on weekdays between 8:00 and 17:00, and the courier brings a padded box, "
            "so no packaging is needed.",
        ]]),
        ("Costs", [[
            F("Out-of-warranty repairs start with a fixed diagnosis fee of 47 euros.",
              "47 euros", "Out-of-warranty repairs start with a diagnosis fee of 47 euros.",
              "How much is the diagnosis fee for an out-of-warranty repair?",
              "My device's warranty has run out; what do I pay just to have the fault looked at?"),
            "Parts are charged at list price and labour at 52 euros per hour.",
            F("If a repair would cost more than 60 percent of the price of a new device, the depot offers a "
              "discounted replacement instead.",
              "60 percent", "A discounted replacement is offered when a repair would cost more than 60 "
                            "percent of a new device.",
              "When does the repair depot offer a replacement instead of a repair?",
              "At what point does fixing my unit become too expensive, so that Velmora suggests a new one?"),
        ]]),
        ("Turnaround and guarantee", [[
            F("The average repair takes 9 working days from arrival at the depot.",
              "9 working days", "The average repair takes 9 working days from arrival at the depot.",
              "How long does a repair usually take?",
              "Once my device reaches the repair depot, how soon can I expect it back fixed?"),
            "Express repairs for business customers are finished within 3 working days for an extra fee.",
            F("Repaired devices carry a repair warranty of 150 days.",
              "150 days", "Repaired devices carry a repair warranty of 150 days.",
              "How long is the warranty on a repaired device?",
              "If the same fault comes back after a repair, for how long is the fix guaranteed?"),
        ]]),
    ]),
    ("data-retention.md", "Data Retention Policy", [
        (None, [[
            "This policy says how long Velmora keeps each kind of data and who decides when it is deleted.",
            "It follows the privacy law of the country and was last updated in September 2024.",
        ]]),
        ("Customer data", [[
            F("Raw sensor readings are kept for 29 months and then deleted.",
              "29 months", "Raw sensor readings are kept for 29 months.",
              "How long does Velmora keep raw sensor readings?",
              "When will the measurements my water sensors sent be erased from Velmora's systems?"),
            "Monthly summaries of those readings are kept for as long as the account is open.",
            F("Customer support call recordings are kept for 93 days.",
              "93 days", "Support call recordings are kept for 93 days.",
              "How long are support call recordings kept?",
              "I phoned the help line; for how long will the recording of my call exist?"),
            F("Closed customer accounts are anonymised 400 days after closure.",
              "400 days", "Closed accounts are anonymised 400 days after closure.",
              "When is a closed customer account anonymised?",
              "After I close my account, how long until my personal details are stripped out?"),
        ]]),
        ("Company records", [[
            F("Invoices are archived for 11 years.",
              "11 years", "Invoices are archived for 11 years.",
              "How long are invoices archived?",
              "For how many years does Velmora hold on to its billing documents?"),
            "Job applications from unsuccessful candidates are deleted after 6 months, and staff records 7 "
            "years after the employee leaves.",
            "Email is kept for 5 years unless it is marked for longer retention.",
            F("Backups are kept in an off-site vault in the village of Heddlecombe.",
              "Heddlecombe", "Backups are kept in an off-site vault in Heddlecombe.",
              "Where are Velmora's backups stored?",
              "In which place does the company keep its off-site copies of data?"),
        ]]),
        ("Requests", [[
            F("Deletion requests from customers are handled by the privacy officer, Anselm Dubrovka.",
              "Anselm Dubrovka", "Deletion requests are handled by the privacy officer, Anselm Dubrovka.",
              "Who handles customer deletion requests?",
              "I want Velmora to erase my data; which person deals with that?"),
            "Requests are answered within 30 days, or 60 days for complex cases.",
            "Data that the law requires us to keep, such as invoices, is kept even after a deletion request, "
            "but it is locked away from everyday use.",
        ]]),
    ]),
    ("loyalty-programme.html", "Velmora Circle Loyalty Programme", [
        (None, [[
            "Velmora Circle rewards customers who buy filters, sensors and service plans from us directly.",
            "Membership is free and open to any customer aged 18 or over, and one household may hold up to 3 "
            "memberships.",
        ]]),
        ("Earning points", [[
            F("Members earn 3 Circle points for every euro spent.",
              "3 Circle points", "Members earn 3 Circle points for every euro spent.",
              "How many points do members earn per euro?",
              "If I spend money in the Velmora shop, at what rate do I collect loyalty points?"),
            "Purchases from resellers do not earn points, and neither do delivery charges.",
            F("Points expire 22 months after they are earned.",
              "22 months", "Points expire 22 months after they are earned.",
              "When do Circle points expire?",
              "How long can I save up my loyalty points before I lose them?"),
        ]]),
        ("Spending points", [[
            F("700 points can be exchanged for a voucher worth 10 euros.",
              "700 points", "700 points can be exchanged for a 10 euro voucher.",
              "How many points do I need for a 10 euro voucher?",
              "What does it take in points to get a ten-euro voucher from the programme?"),
            "Vouchers are valid for 90 days and cannot be combined with sale prices.",
            "Points can also pay for up to half the cost of a CareLine Plus plan, at 100 points per euro.",
            "Points are added to your account 45 days after delivery, once the return window for the order "
            "has closed.",
        ]]),
        ("Gold status", [[
            F("Gold status requires 4,800 points in a calendar year.",
              "4,800 points", "Gold status requires 4,800 points in a calendar year.",
              "How many points are needed for Gold status?",
              "What do I have to collect in a year to move up to the top membership level?"),
            F("Gold members get free express delivery on every order.",
              "free express delivery", "Gold members get free express delivery on every order.",
              "What delivery benefit do Gold members get?",
              "Does reaching Gold change anything about how my orders are shipped?"),
            F("The programme is run by the partner company Lindqvarn Rewards.",
              "Lindqvarn Rewards", "The programme is run by Lindqvarn Rewards.",
              "Which company runs the Velmora Circle programme?",
              "Who operates the loyalty scheme on Velmora's behalf?"),
        ]]),
    ]),
    ("firmware-updates.md", "Firmware Update Process", [
        (None, [[
            "Aerolith purifiers, Hydrasent sensors and the Velmora Hub all run firmware that Velmora updates "
            "over the air.",
            "This page describes how releases are made and installed.",
        ]]),
        ("Releases", [[
            F("Firmware releases are published on the second Thursday of each month.",
              "second Thursday", "Firmware releases are published on the second Thursday of each month.",
              "When are firmware releases published?",
              "On which day of the month should I expect new firmware to come out?"),
            F("The current stable firmware version is 8.14.2.",
              "8.14.2", "The current stable firmware version is 8.14.2.",
              "What is the current stable firmware version?",
              "Which firmware release should a fully up-to-date device be running?"),
            "The previous release was 8.13.9, and 8.15.0-rc1 is in testing.",
            F("Beta firmware is available to members of the Early Light programme.",
              "Early Light", "Beta firmware is available to members of the Early Light programme.",
              "Who can get beta firmware?",
              "Which programme do I need to join to try pre-release firmware?"),
        ]]),
        ("Installation", [[
            F("Devices download updates between 02:00 and 04:00 local time.",
              "02:00 and 04:00", "Devices download updates between 02:00 and 04:00 local time.",
              "When do devices download firmware updates?",
              "At what time of night will my purifier fetch new software?"),
            "An update takes about 6 minutes, and the device keeps working while it downloads.",
            "Devices that are switched off at night install the update within 10 minutes of the next start.",
            F("A failed update rolls back automatically after 3 failed boot attempts.",
              "3 failed boot attempts", "A failed update rolls back after 3 failed boot attempts.",
              "When does a failed firmware update roll back?",
              "What happens if my device can't start after an update, and how many tries does it make "
              "first?"),
        ]]),
        ("Security", [[
            F("Firmware files are signed with the key identifier VMK-2208.",
              "VMK-2208", "Firmware files are signed with the key identifier VMK-2208.",
              "Which key identifier signs Velmora firmware?",
              "How can I tell which signing key a genuine firmware file was signed with?"),
            "Devices refuse any file whose signature does not check out.",
            "The previous signing key, VMK-1907, was retired in 2022, and files signed with it are no longer "
            "accepted.",
            "Security fixes may be released outside the monthly schedule and are installed within 24 hours.",
        ]]),
    ]),
    ("leave-policy.md", "Annual Leave and Holidays", [
        (None, [[
            "This policy applies to all employees on a Velmora contract, full time or part time.",
            "Part-time employees receive leave in proportion to their hours.",
        ]]),
        ("Entitlement", [[
            F("Full-time employees receive 29 days of annual leave.",
              "29 days", "Full-time employees receive 29 days of annual leave.",
              "How many days of annual leave do full-time employees get?",
              "What is my holiday allowance for a year if I work full time?"),
            F("Employees get one extra day of leave after every 4 years of service.",
              "4 years of service", "Employees get one extra day of leave after every 4 years of service.",
              "How does leave increase with length of service?",
              "Do long-serving staff get more holiday, and how often is a day added?"),
            F("Up to 6 unused days can be carried over into the next year.",
              "6 unused days", "Up to 6 unused days can be carried over into the next year.",
              "How many unused leave days can be carried over?",
              "If I don't take all my holiday, how much of it can I keep for next year?"),
        ]]),
        ("Requests", [[
            F("Leave is requested in the HR system called Tidewell.",
              "Tidewell", "Leave is requested in the HR system Tidewell.",
              "Which system do I use to request leave?",
              "Where do I go to book some days off?"),
            F("Leave of more than 10 consecutive days must be requested 8 weeks in advance.",
              "8 weeks", "Leave of more than 10 consecutive days must be requested 8 weeks in advance.",
              "How far ahead must long leave be requested?",
              "I want to take a three-week holiday; how early do I have to ask?"),
            "Shorter leave needs 5 working days' notice, and a single day can be booked with 1 day's notice.",
            "Managers answer requests within 3 working days, and requests that receive no answer count as "
            "approved.",
        ]]),
        ("Company holidays", [[
            F("The company closes for Founders' Day on 17 June.",
              "17 June", "The company closes for Founders' Day on 17 June.",
              "When is Founders' Day?",
              "On what date does Velmora shut for its own company holiday?"),
            "The offices also close between 24 and 26 December.",
            "Staff who must work on a company holiday, such as the warehouse team in a busy season, receive "
            "2 days of leave in return.",
            "Sick leave is not taken from annual leave and is recorded separately.",
        ]]),
    ]),
    ("it-equipment.txt", "IT Equipment Policy", [
        (None, [[
            "This policy covers the laptops, phones and accessories Velmora provides to staff.",
            "All equipment remains company property and must be returned when you leave.",
        ]]),
        ("Laptops", [[
            F("The standard laptop model is the Korvath Slate 14.",
              "Korvath Slate 14", "The standard laptop model is the Korvath Slate 14.",
              "What is the standard staff laptop model?",
              "Which computer will I be issued when I join?"),
            "Engineers may request a model with 32 GB of memory instead.",
            F("Staff laptops are replaced every 42 months.",
              "42 months", "Staff laptops are replaced every 42 months.",
              "How often are staff laptops replaced?",
              "When will I get a new work computer to replace my current one?"),
            F("Returned laptops are wiped and donated to the Osterwick Youth Workshop.",
              "Osterwick Youth Workshop", "Returned laptops are donated to the Osterwick Youth Workshop.",
              "What happens to returned laptops?",
              "Where do our old work computers end up once they are handed back?"),
        ]]),
        ("Phones and home working", [[
            F("Personal phones may access company email only after installing the Velmora Warden app.",
              "Velmora Warden", "Personal phones need the Velmora Warden app to access company email.",
              "What must I install to read company email on my own phone?",
              "Can I check work mail on my personal mobile, and what is needed first?"),
            F("Every employee may claim 185 euros towards a home office chair.",
              "185 euros", "Employees may claim 185 euros towards a home office chair.",
              "How much can I claim for a home office chair?",
              "Does the company contribute to a chair for working from home, and how much?"),
            "A second monitor can be borrowed from the IT store for up to 12 months, and a headset is "
            "provided to everyone who works in support.",
        ]]),
        ("Loss and theft", [[
            F("Lost or stolen equipment must be reported to the IT service desk on extension 2290.",
              "extension 2290", "Lost or stolen equipment is reported on extension 2290.",
              "Which extension do I call to report lost equipment?",
              "My work laptop was stolen from my car; whom do I phone and on what number?"),
            "Report it to the police too, and bring the crime number to the service desk within 2 days.",
        ]]),
    ]),
    ("incident-response.md", "Security Incident Response", [
        (None, [[
            "This procedure applies to any event that may harm the confidentiality, integrity or "
            "availability of Velmora data.",
            "When in doubt, report: a false alarm costs little.",
            "Do not switch off an affected laptop or delete suspicious email, as both may be needed as "
            "evidence.",
        ]]),
        ("Reporting", [[
            F("Suspected incidents must be reported to the security desk within 90 minutes of discovery.",
              "90 minutes", "Suspected incidents must be reported within 90 minutes of discovery.",
              "How quickly must a suspected security incident be reported?",
              "I think I clicked a phishing link an hour ago; how long did I have to tell the security "
              "desk?"),
            F("The security desk can be reached on extension 3113 at any hour.",
              "extension 3113", "The security desk is on extension 3113.",
              "What is the security desk's phone extension?",
              "How do I reach the people who handle security incidents by phone?"),
        ]]),
        ("Severity", [[
            F("Incidents are graded from S1 to S4, where S1 means customer data has left the company.",
              "S1", "S1 means customer data has left the company.",
              "What does severity S1 mean?",
              "Which situation gets the most serious incident grade?"),
            "S2 covers internal data exposed to the wrong staff, and S3 and S4 cover attempts that failed.",
            F("An S1 incident is run from the incident room in meeting room Harbour 3.",
              "Harbour 3", "An S1 incident is run from meeting room Harbour 3.",
              "Where is an S1 incident run from?",
              "In which room does the team gather when the most serious kind of incident happens?"),
        ]]),
        ("After the incident", [[
            F("Customers affected by a data breach are notified within 67 hours.",
              "67 hours", "Affected customers are notified within 67 hours of a data breach.",
              "How soon are customers told about a data breach?",
              "If my data was caught up in a breach, within what time will Velmora let me know?"),
            "The regulator is informed within 72 hours, as the law requires.",
            "The review is shared with the whole company within 30 days, without naming the people involved.",
            F("After every incident a review is written using the template IR-REV-5.",
              "IR-REV-5", "Incident reviews use the template IR-REV-5.",
              "Which template is used for incident reviews?",
              "When the incident is over, which form do we fill in for the write-up?"),
        ]]),
    ]),
    ("company-history.md", "Our History", [
        (None, [[
            "Velmora Dynamics makes instruments that keep the air and water of buildings healthy.",
            "This page tells how a two-person workshop became the company it is today.",
        ]]),
        ("Beginnings", [[
            F("The company began in 1994 in a converted boathouse on the Osterwick waterfront.",
              "1994", "The company began in 1994.",
              "In what year was Velmora Dynamics founded?",
              "Since what year has Velmora been in business?"),
            F("Velmora was founded by Edda Marwick and Tomas Strell, two engineers from the local shipyard.",
              "Edda Marwick", "Velmora was founded by Edda Marwick and Tomas Strell.",
              "Who founded Velmora Dynamics?",
              "Who were the two engineers that set up the business?"),
            F("The name Velmora joins the names of the founders' two home villages, Velden and Morash.",
              "Velden and Morash", "The name joins the founders' home villages, Velden and Morash.",
              "Where does the name Velmora come from?",
              "Why is the company called Velmora?"),
        ]]),
        ("Growth", [[
            F("The first product was a mechanical humidity gauge called the Velmora Tern.",
              "Velmora Tern", "The first product was a humidity gauge called the Velmora Tern.",
              "What was Velmora's first product?",
              "Which device did the company sell before anything else?"),
            "It sold 3,100 units in its first year, mostly to boat owners and museums.",
            F("In 2008 Velmora bought the sensor maker Ostrand Labs, whose engineers became the Hydrasent "
              "team.",
              "Ostrand Labs", "Velmora bought Ostrand Labs, whose engineers became the Hydrasent team.",
              "Which company did Velmora buy to start its water sensor business?",
              "Where did the people who build the Hydrasent range originally come from?"),
        ]]),
        ("Today", [[
            F("The company now employs 1,340 people.",
              "1,340 people", "Velmora employs 1,340 people.",
              "How many people does Velmora Dynamics employ?",
              "What is the size of Velmora's workforce?"),
            "It sells in 11 countries and ships about 90,000 devices a year.",
            "The Aerolith range followed in 2016, and the Velmora Hub, which links every device to one "
            "dashboard, in 2020.",
            "The original boathouse still stands and is now used as a meeting space for visiting customers.",
        ]]),
    ]),
    ("calibration-procedure.md", "Hydrasent Calibration Procedure", [
        (None, [[
            "This procedure is for installers and site technicians who maintain Hydrasent sensors.",
            "It takes about 25 minutes per sensor, including cleaning.",
        ]]),
        ("Schedule and kit", [[
            F("Hydrasent sensors must be calibrated every 97 days.",
              "97 days", "Hydrasent sensors must be calibrated every 97 days.",
              "How often must Hydrasent sensors be calibrated?",
              "How long can a water sensor go between calibrations?"),
            F("Calibration uses the buffer solution kit CK-88.",
              "CK-88", "Calibration uses the buffer solution kit CK-88.",
              "Which buffer solution kit is used for calibration?",
              "What solution kit do I bring to a site to calibrate the sensors?"),
            "Each kit holds enough solution for 8 sensors and must be used within 4 months of opening.",
            "Sites with hard water or heavy chlorine dosing may need calibration more often, as the probe "
            "coats faster.",
        ]]),
        ("Steps", [[
            "Switch the sensor to service mode in the Velmora Hub so that no alarms are raised during the "
            "work.",
            "Clean the probe with distilled water and dry it with a lint-free cloth.",
            F("Calibration must be done at a water temperature between 19 and 23 degrees Celsius.",
              "19 and 23 degrees", "Calibration must be done between 19 and 23 degrees Celsius.",
              "At what water temperature must calibration be done?",
              "How warm or cold may the water be while I calibrate a probe?"),
            F("The sensor must rest in the buffer solution for 12 minutes before the reading is accepted.",
              "12 minutes", "The sensor must rest in the buffer solution for 12 minutes.",
              "How long must the sensor rest in the buffer solution?",
              "How long do I leave the probe sitting in the solution before I take the reading?"),
        ]]),
        ("Records", [[
            F("Calibration results are logged in the Velmora Hub under the tab Probe Health.",
              "Probe Health", "Calibration results are logged under the Probe Health tab in the Velmora Hub.",
              "Where are calibration results logged?",
              "After calibrating, where in the Hub do I find or record the results?"),
            F("A probe that drifts by more than 0.35 pH units between calibrations must be replaced.",
              "0.35 pH units", "A probe that drifts more than 0.35 pH units between calibrations must be "
                               "replaced.",
              "When must a Hydrasent probe be replaced?",
              "How much drift between two calibrations means a probe has to be swapped?"),
        ]]),
    ]),
]

HTML_STYLE = ("body { font-family: Georgia, serif; max-width: 46em; margin: 2em auto; color: #222; }\n"
              "    h1 { color: #1d4e6b; border-bottom: 2px solid #1d4e6b; }\n"
              "    h2 { color: #1d4e6b; margin-top: 1.5em; }\n"
              "    p { line-height: 1.5; }")


def _text(item: str | Fact) -> str:
    return item.sentence if isinstance(item, Fact) else item


def render(name: str, title: str, sections: list[Section]) -> str:
    """The document's text: Markdown, plain text or HTML by its suffix; one paragraph a line, so every
    sentence is in the file verbatim."""
    suffix = Path(name).suffix
    if suffix == ".md":
        out = [f"# {title}", ""]
        for heading, paragraphs in sections:
            if heading:
                out += [f"## {heading}", ""]
            out += [line for p in paragraphs for line in (" ".join(map(_text, p)), "")]
        return "\n".join(out)
    if suffix == ".txt":
        out = [f"{COMPANY.upper()}: {title.upper()}", ""]
        number = 0
        for heading, paragraphs in sections:
            if heading:
                number += 1
                out += [f"{number}. {heading}", ""]
            out += [line for p in paragraphs for line in (" ".join(map(_text, p)), "")]
        return "\n".join(out)
    if suffix == ".html":
        def e(text: str) -> str:
            return html.escape(text, quote=False)

        out = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "  <meta charset=\"utf-8\">",
               f"  <title>{e(title)} | {COMPANY}</title>", "  <style>", f"    {HTML_STYLE}", "  </style>",
               "</head>", "<body>", f"  <h1>{e(title)}</h1>"]
        for heading, paragraphs in sections:
            if heading:
                out.append(f"  <h2>{e(heading)}</h2>")
            out += [f"  <p>{e(' '.join(map(_text, p)))}</p>" for p in paragraphs]
        out += [f"  <footer><p>{COMPANY}, internal and customer documentation.</p></footer>", "</body>",
                "</html>", ""]
        return "\n".join(out)
    raise ValueError(f"{name}: unknown suffix {suffix}")


def _words(text: str) -> int:
    return len(re.sub(r"<style>.*?</style>|<[^>]+>", " ", text, flags=re.S).split())


def _has(text: str, key: str) -> bool:
    """`key` in `text` as a whole token run (case-insensitive): 'VX-7' is not in 'VX-7318'."""
    return re.search(r"(?<![\w,.])" + re.escape(key.lower()) + r"(?![\w]|[,.]\d)", text.lower()) is not None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _row(question: str, fact: Fact, source: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": fact.answer}], "source": source,
            "quote": fact.sentence}


def build() -> tuple[dict[str, str], list[dict], list[dict]]:
    """The documents (name -> text) and the train and eval rows; raises ValueError on any broken check."""
    docs = {name: render(name, title, sections) for name, title, sections in DOCS}
    facts = {
        name: [item for _, paragraphs in sections for p in paragraphs for item in p if isinstance(item, Fact)]
        for name, _, sections in DOCS
    }
    problems = []
    if len(docs) != len(DOCS):
        problems.append("two documents share a file name")
    for name in HOLDOUT:
        if name not in docs:
            problems.append(f"HOLDOUT names {name}, which is not a document")
    seen_questions: set[str] = set()
    seen_quotes: set[str] = set()
    for name, text in docs.items():
        words = _words(text)
        if not 150 <= words <= 400:
            problems.append(f"{name}: {words} words, expected 150-400")
        if not 5 <= len(facts[name]) <= 7:
            problems.append(f"{name}: {len(facts[name])} facts, expected 5-7")
        for fact in facts[name]:
            where = f"{name}: {fact.key!r}"
            quote = html.escape(fact.sentence, quote=False) if name.endswith(".html") else fact.sentence
            if quote not in text:
                problems.append(f"{where}: the quote is not in the document")
            if not _has(fact.sentence, fact.key):
                problems.append(f"{where}: the key is not in the quote")
            if not _has(fact.answer, fact.key):
                problems.append(f"{where}: the key is not in the answer")
            others = [other for other, other_text in docs.items() if other != name and _has(other_text,
                                                                                            fact.key)]
            if others:
                problems.append(f"{where}: the key is also in {', '.join(others)}")
            if not fact.answer.endswith(".") or fact.answer.count(". ") > 0:
                problems.append(f"{where}: the answer should be one sentence")
            if fact.sentence in seen_quotes:
                problems.append(f"{where}: the quote repeats another fact's")
            seen_quotes.add(fact.sentence)
            for q in (fact.q_a, fact.q_b):
                if _norm(q) in seen_questions:
                    problems.append(f"{where}: the question {q!r} repeats an earlier one")
                seen_questions.add(_norm(q))
    if problems:
        raise ValueError("the docs-qa data failed its checks:\n  " + "\n  ".join(problems))

    train, known, unseen = [], [], []
    for name, _, _ in DOCS:
        for fact in facts[name]:
            if name in HOLDOUT:
                unseen.append(_row(fact.q_a, fact, name))
            else:
                train.append(_row(fact.q_a, fact, name))
                known.append(_row(fact.q_b, fact, name))
    rng = random.Random(0)
    rng.shuffle(train)
    eval_rows = known + unseen
    rng.shuffle(eval_rows)
    return docs, train, eval_rows


def main() -> None:
    docs, train, eval_rows = build()
    doc_dir, data_dir = HERE / "docs", HERE / "data"
    doc_dir.mkdir(exist_ok=True)
    for old in doc_dir.iterdir():  # a document renamed in DOCS leaves no stale file behind
        if old.is_file() and old.name not in docs:
            old.unlink()
    for name, text in docs.items():
        (doc_dir / name).write_text(text, encoding="utf-8")
    qa_data.write(data_dir, train, eval_rows)
    unseen = sum(r["source"] in HOLDOUT for r in eval_rows)
    words = [_words(t) for t in docs.values()]
    print(
        f"wrote {len(docs)} documents ({len(HOLDOUT)} held out; {min(words)}-{max(words)} words) to "
        f"{doc_dir}")
    print(f"eval rows: {len(eval_rows) - unseen} known-document (wording B), {unseen} unseen-document "
          f"(from {', '.join(HOLDOUT)})")


if __name__ == "__main__":
    main()
