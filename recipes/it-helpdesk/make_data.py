"""Write the it-helpdesk dataset: data/train.jsonl and data/eval.jsonl (OpenAI chat fine-tuning format).

The internal IT helpdesk of "Halden Systems", a fictional company: accounts, VPN, laptops, badges, printers,
software and mail. Every fact (portals, extensions, floors, limits) is made up, so a base model cannot know
the answers and a fine-tune must learn them. Built exactly like the support-bot set by ../_qa_data.py: one
canonical answer and ten user questions per intent, one or two held out for eval, style variants and about
10% two-turn chats in train.

Deterministic (seeded); run by hand from anywhere:  python recipes/it-helpdesk/make_data.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qa_data)

SYSTEM_PROMPT = ("You are the IT helpdesk assistant for Halden Systems employees. "
                 "Answer briefly and accurately.")
# Words that keep their capital letter when a greeting is put in front of a question.
NAMES = ("Halden", "HaldenDrive", "AppShelf", "Outlook", "Vaultline")

# (intent, canonical answer, user questions). Answers stay short and concrete so a small model can learn them.
INTENTS: list[tuple[str, str, list[str]]] = [
    ("reset_password",
     "Go to id.halden.example, click \"Forgot password\" and enter the code sent to your phone. New "
     "passwords need at least 14 characters and expire every 180 days.",
     ["How do I reset my password?", "I forgot my Halden password", "password reset",
      "Where can I change my login password?", "My password expired, how do I set a new one?",
      "How long does a new password have to be?", "i need a new pasword for my work account",
      "How often do I have to change my password?", "Can you reset my password for me?",
      "What's the self-service password page?"]),
    ("account_locked",
     "Your account locks for 15 minutes after 5 wrong passwords. To unlock it sooner, call the helpdesk on "
     "extension 4357 and give your employee number.",
     ["My account is locked", "I typed the wrong password too many times", "account locked out",
      "How long does an account lockout last?", "It says my account is locked, what do I do?",
      "How many wrong password attempts before I get locked out?", "can you unlock my acount please",
      "I'm locked out of my laptop", "Is there a way to unlock my account right now?",
      "Why can't I sign in after entering my password wrong?"]),
    ("mfa_new_phone",
     "Sign in at id.halden.example > Security > Sign-in methods with your old phone or a backup code and add "
     "the new phone. If you have neither, bring your badge to the IT desk on floor 2.",
     ["I got a new phone, how do I move my MFA?", "How do I set up the authenticator on my new phone?",
      "new phone mfa", "My phone was stolen and I can't approve sign-ins",
      "How do I change the phone used for two-factor?", "I lost the phone with my authenticator app",
      "Where do I add a new sign-in method?", "mfa codes not working after switching phones",
      "Can I use a backup code to sign in?", "how do i reset my multi factor authentcation"]),
    ("vpn_setup",
     "Install Halden Connect from AppShelf, enter the server vpn.halden.example and sign in with your Halden "
     "account, then approve the MFA prompt.",
     ["How do I set up the VPN?", "Which VPN client do we use?", "vpn setup",
      "How do I connect to the company network from home?", "What is the VPN server address?",
      "Where do I download the VPN?", "how do i get on the vpn from my laptop",
      "I need VPN access to reach internal sites", "Do I have to install something to work remotely?",
      "How do I configure Halden Connect?"]),
    ("vpn_not_connecting",
     "Check that the internet works without the VPN, then quit Halden Connect and try again. For error 809, "
     "switch from hotel or guest Wi-Fi to a phone hotspot; otherwise open a ticket with a screenshot.",
     ["The VPN won't connect", "I get error 809 on the VPN", "vpn not working",
      "Halden Connect keeps disconnecting", "Why can't I connect to the VPN from my hotel?",
      "VPN says connection failed", "my vpn conection drops every few minutes",
      "The VPN worked yesterday but not today", "What does VPN error 809 mean?",
      "I can't reach internal sites even though the VPN is on"]),
    ("wifi_access",
     "Company laptops join HALDEN-CORP automatically. Personal phones use HALDEN-STAFF with your Halden "
     "account, and visitors use HALDEN-GUEST with the daily code from reception.",
     ["What is the Wi-Fi password?", "How do I connect my phone to the office Wi-Fi?", "wifi",
      "Which network should my laptop use?", "Is there guest Wi-Fi for visitors?",
      "My visitor needs internet access", "what's the wifi code for guests",
      "Can I put my personal phone on the company network?", "Which wireless network is for staff?",
      "How do I get on the wirless in the office?"]),
    ("new_laptop",
     "Laptops are replaced every 4 years. If yours is older or broken beyond repair, your manager requests a "
     "new one in the IT Portal under Hardware > Laptop; delivery takes about 5 working days.",
     ["How do I get a new laptop?", "My laptop is really old, can I get a replacement?", "new laptop",
      "How often are laptops replaced?", "Can I request a MacBook?", "Who orders a laptop for me?",
      "how long does it take to get a new laptop", "I want a faster computer",
      "When is my laptop due for replacement?", "Where do I ask for a laptop upgrade?"]),
    ("laptop_repair",
     "Bring the laptop to the IT desk on floor 2, Monday to Friday 8:30 to 17:00, and you get a loaner the "
     "same day. Accidental damage is covered if you report it within 48 hours.",
     ["My laptop is broken", "I spilled coffee on my laptop", "laptop repair",
      "The screen on my laptop is cracked", "Where do I take my laptop to be fixed?",
      "Can I get a loaner laptop while mine is repaired?", "my keyboard stopped working on my laptop",
      "Do I have to pay if I dropped my laptop?", "When is the IT desk open?",
      "My laptop won't turn on anymore"]),
    ("lost_laptop",
     "Call extension 4357 right away, at any hour: we lock and wipe the laptop remotely. If it was stolen, "
     "also report it to the police and send us the reference number.",
     ["I lost my laptop", "My laptop was stolen", "laptop stolen",
      "I left my work laptop on the train", "What do I do if my laptop goes missing?",
      "Someone took my bag with my company laptop", "can you wipe my laptop remotly",
      "Who do I call about a stolen laptop?", "I can't find my laptop anywhere",
      "Do I need a police report for a stolen laptop?"]),
    ("lost_badge",
     "Report a lost badge at security.halden.example or at reception so it is disabled at once. The first "
     "replacement is free and is ready at reception the next working day.",
     ["I lost my badge", "My access card is gone", "lost badge",
      "How do I get a replacement badge?", "Does a new badge cost anything?", "My badge was stolen",
      "how do i report a lost acess card", "When will my new badge be ready?",
      "I think I left my badge somewhere", "Can you deactivate my old badge?"]),
    ("badge_access",
     "Your manager requests access in the IT Portal under Access > Building areas. The server room also "
     "needs Facilities' approval, and that access lasts 90 days at a time.",
     ["My badge doesn't open the lab door", "How do I get access to another floor?", "badge access",
      "Can I get into the server room?", "Who approves door access?", "I need access to the warehouse",
      "my badge dont work on the 4th floor", "How do I request building access for a room?",
      "How long does server room access last?", "Why won't my badge open this door?"]),
    ("forgot_badge",
     "Reception gives you a day pass after checking your photo ID. A day pass opens the main doors and your "
     "own floor and stops working at midnight.",
     ["I forgot my badge at home", "How do I get in without my badge?", "forgot badge",
      "Can I get a temporary badge for today?", "Left my access card at home today",
      "What is a day pass?", "how do i get a temp pass",
      "Does a day pass open every floor?", "I don't have my badge with me",
      "Can reception let me in without a card?"]),
    ("printer_setup",
     "Windows laptops get the FollowMe printer automatically; on a Mac, add it from Self Service > Printers. "
     "Print to FollowMe, then tap your badge on any office printer to release the job.",
     ["How do I add a printer?", "How do I print from my Mac?", "printer setup",
      "Which printer should I print to?", "I can't find the printer on my laptop",
      "How does FollowMe printing work?", "how do i print something in the office",
      "Do I need a driver for the printers?", "How do I release my print job?",
      "Set up printing on my new laptop"]),
    ("printer_problem",
     "Your job waits in the FollowMe queue for 24 hours, so tap your badge on another printer. Report a "
     "jammed or broken printer in the IT Portal with the number on its front sticker.",
     ["The printer is jammed", "My print job didn't come out", "printer not working",
      "The printer says out of toner", "Where is my print job?", "How do I report a broken printer?",
      "printer on floor 3 is broken agian", "My badge doesn't release my print job",
      "How long do print jobs stay in the queue?", "Nothing happens when I tap my badge on the printer"]),
    ("color_printing",
     "Printing is black and white and double-sided by default. To print in colour choose \"FollowMe "
     "Colour\"; colour pages are charged to your team's cost centre.",
     ["How do I print in color?", "Can I print in colour?", "color printing",
      "Why is everything printing in black and white?", "Who pays for colour prints?",
      "How do I print single-sided?", "is colour printing allowed",
      "Which printer does color?", "My printouts are always double-sided, can I change that?",
      "Print a colour brochure"]),
    ("software_request",
     "Approved software is in AppShelf and installs without approval. Anything else is requested in the IT "
     "Portal under Software > Request; paid licences need your manager's approval and take 3 working days.",
     ["How do I install new software?", "Can I get Photoshop?", "software request",
      "Where do I find approved apps?", "How long does a software licence take?",
      "I need a program that's not in AppShelf", "how do i request a licence for a paid tool",
      "Can I install apps myself?", "Who approves software purchases?", "How do I get Visio installed?"]),
    ("admin_rights",
     "Company laptops have no permanent admin rights. Developers can request 8 hours of temporary admin "
     "access in the IT Portal under Access > Local admin.",
     ["Can I get admin rights on my laptop?", "How do I become local administrator?", "admin rights",
      "It asks for an admin password to install something", "I need temporary admin access",
      "Why am I not an administrator on my computer?", "how long does temp admin last",
      "Can developers have admin access?", "Request elevated rights please",
      "Why can't I install drivers on my laptop?"]),
    ("mailbox_full",
     "Each mailbox holds 50 GB. Empty Deleted Items and move old mail to the Online Archive, which has no "
     "size limit and keeps mail for 7 years.",
     ["My mailbox is full", "How big can my mailbox be?", "mailbox full",
      "Outlook says I'm over my storage quota", "How do I free up space in my email?",
      "What is the Online Archive?", "i can't send emails because my inbox is ful",
      "How long is archived mail kept?", "Can I get more email storage?", "What's the mailbox size limit?"]),
    ("shared_mailbox",
     "Your manager requests access in the IT Portal under Access > Shared mailbox. Once approved, the "
     "mailbox appears in Outlook by itself within 2 hours.",
     ["How do I get access to the team mailbox?", "How do I add a shared mailbox to "
                                                  "Outlook?", "shared mailbox",
      "I can't see the support@ mailbox", "Can we get a new shared inbox for our team?",
      "Who approves shared mailbox access?", "how long until the shared mailbox shows up",
      "I need to send from the team address", "Request access to a group mailbox",
      "The shared mailbox isn't in my Outlook yet"]),
    ("phishing",
     "Don't click anything: use the \"Report phish\" button in Outlook or forward the email as an attachment "
     "to phish@halden.example. If you already clicked a link, change your password and call extension 4357.",
     ["I got a suspicious email", "How do I report phishing?", "phishing",
      "I clicked a link in a scam email", "Is this email from IT real?", "Someone asked for my password by "
                                                                         "email",
      "what do i do with a phising email", "Where do I forward spam?",
      "I think I entered my password on a fake site", "Report a suspicious message"]),
    ("file_storage",
     "Save work files on HaldenDrive, in your personal folder or your team's space; it is backed up every "
     "night. Files on the laptop's desktop or downloads folder are not backed up.",
     ["Where should I save my files?", "Are my files backed up?", "file storage",
      "Is my desktop backed up?", "Where do I keep team documents?", "Where do I save documents so they are "
                                                                     "backed up?",
      "can i save work stuff on my laptop", "What is HaldenDrive?",
      "Where do shared project files go?", "How often are files backed up?"]),
    ("restore_file",
     "Deleted HaldenDrive files stay in its recycle bin for 60 days. For anything older, open a ticket with "
     "the file path and date; backups go back 1 year.",
     ["I deleted a file by mistake", "How do I recover a deleted file?", "restore file",
      "Can I get back an older version of a document?", "Where is the HaldenDrive recycle bin?",
      "How far back do backups go?", "i accidently deleted a folder",
      "A file I need was deleted three months ago", "Can IT restore a file from backup?",
      "How long are deleted files kept?"]),
    ("new_starter",
     "The manager submits the New starter form in the IT Portal at least 10 working days before the start "
     "date. The account, laptop and badge are then ready at reception on the first morning.",
     ["Someone new is joining my team, what do I do?", "How do I set up an account for a new "
                                                       "hire?", "new starter",
      "When do I need to request a laptop for a new employee?", "Onboarding a new colleague",
      "Where is the new starter form?", "how early should i tell IT about a new hire",
      "Where does a new employee pick up their laptop?", "How does IT onboarding work?",
      "My new team member starts Monday and has no account"]),
    ("leaver",
     "The manager submits the Leaver form in the IT Portal. The account closes at 18:00 on the last day, and "
     "the laptop and badge are returned to the IT desk on floor 2.",
     ["Someone is leaving my team", "What happens to my account when I leave?", "leaver",
      "Where do I return my laptop on my last day?", "How do I offboard an employee?",
      "When is a leaver's account closed?", "im leaving the company, what do i give back",
      "Who fills in the leaver form?", "Do I hand in my badge when I leave?",
      "How do I close the account of someone who quit?"]),
    ("peripherals",
     "Monitors, docks, keyboards, mice and headsets are free from the IT desk on floor 2; just bring your "
     "badge. A monitor for home is requested in the IT Portal under Hardware > Home office.",
     ["Can I get a second monitor?", "I need a new mouse", "headset",
      "Where do I get a docking station?", "Can I take a monitor home?", "My keyboard is broken, can I get a "
                                                                         "new one?",
      "how do i get a headset for calls", "Do accessories like docks cost anything?",
      "Is there home office equipment?", "Where can I pick up accessories for my desk?"]),
    ("mobile_phone",
     "Company phones are for roles that are on call or travel more than 30% of the time; your manager "
     "requests one under Hardware > Mobile. Otherwise add work mail to your own phone with the Halden Work "
     "app.",
     ["Can I get a company phone?", "How do I get work email on my phone?", "mobile phone",
      "Who gets a work phone?", "Can I use my personal phone for work?", "How do I set up the Halden Work "
                                                                         "app?",
      "i need a phone for on call duty", "Can I read Teams messages on my own phone?",
      "How do I request a mobile?", "Does my role qualify for a work phone?"]),
    ("travel_abroad",
     "Tell IT at least 5 working days before a trip outside the EU with a ticket in the IT Portal under "
     "Travel. Some countries need a clean loaner laptop, and the VPN must be approved for them.",
     ["I'm travelling abroad, can I take my laptop?", "Working from another country", "travel",
      "Do I need to tell IT about a business trip?", "Can I use the VPN in China?",
      "I'm going to the US for work next week", "how early do i tell it before i travel",
      "What is a loaner travel laptop?", "Can I work remotely from abroad?",
      "Do I need permission to use my laptop outside the EU?"]),
    ("contact_helpdesk",
     "Open a ticket in the IT Portal at it.halden.example, call extension 4357 (+44 20 7946 0357 from "
     "outside) or visit the IT desk on floor 2. Phones are answered Monday to Friday, 7:00 to 19:00.",
     ["How do I contact IT?", "What's the helpdesk phone number?", "contact",
      "Where is the IT desk?", "How do I open a ticket?", "When is the helpdesk open?",
      "can i call IT from my mobile", "I need to talk to someone in IT",
      "What's the IT Portal address?", "What are the support hours for IT?"]),
    ("ticket_status",
     "Open the IT Portal and click My tickets to see the status and the assigned engineer. Urgent tickets "
     "are answered within 1 hour, normal ones within 1 working day.",
     ["What's the status of my ticket?", "How long until IT answers my ticket?", "ticket status",
      "Nobody replied to my request", "Where can I see my open tickets?", "How quickly are urgent tickets "
                                                                          "handled?",
      "who is working on my tikcet", "How fast do you respond to tickets?",
      "Where do I follow up on a ticket?", "Check on my request please"]),
    ("updates_restart",
     "Updates install automatically on Tuesday nights. When a restart is pending you can postpone it for 3 "
     "days; after that the laptop restarts by itself at 19:00.",
     ["My laptop keeps asking me to restart", "When do updates install?", "updates",
      "Can I postpone a restart?", "Why did my laptop restart on its own?", "How long can I delay updates?",
      "windows update wont stop bugging me", "Do I have to install updates?",
      "My computer restarted during a meeting", "When is patch night?"]),
    ("slow_laptop",
     "Restart the laptop instead of just closing the lid, then run Self Service > Health check, which clears "
     "temporary files and repairs common problems. If it is still slow, open a ticket with the asset number.",
     ["My laptop is very slow", "My computer is freezing", "slow laptop",
      "Everything takes ages to open", "How do I speed up my laptop?", "What is the health check?",
      "laptop super slow since this morning", "My fan is loud and the laptop is slow",
      "Where do I find the asset number?", "Apps keep hanging on my computer"]),
    ("meeting_room_av",
     "Tap Join on the room's Halden Room console to start the meeting from the calendar invite. If the "
     "screen stays black, press the power button on the console; for help call extension 4300.",
     ["How do I start a video call in a meeting room?", "The meeting room screen is black", "meeting room",
      "How do I share my screen in the conference room?", "The room console isn't working",
      "Who helps with meeting room equipment?", "how do i join teams from the big screen",
      "The camera in the meeting room doesn't work", "What's the number for AV support?",
      "How do I use the Halden Room console?"]),
    ("password_manager",
     "Use Vaultline, the company password manager, from AppShelf. Team passwords go in a shared folder your "
     "lead creates; don't save work passwords in your browser.",
     ["Which password manager do we use?", "Where should I store passwords?", "password manager",
      "How do I share a password with my team?", "Can I save passwords in Chrome?",
      "How do I install Vaultline?", "is there a company password safe",
      "Where do team passwords go?", "How do I get a shared folder for passwords?",
      "Is it ok to keep passwords in a spreadsheet?"]),
    ("usb_drives",
     "USB storage is blocked on company laptops. Share files with HaldenDrive links instead, or borrow an "
     "encrypted USB drive from the IT desk if a customer needs one.",
     ["My USB stick doesn't work", "Can I use a USB drive?", "usb",
      "Why is my external hard drive blocked?", "How do I copy files to a memory stick?",
      "A customer needs files on a USB key", "usb stick not showing up on my laptop",
      "Can I get an encrypted USB drive?", "How do I give a big file to a client?",
      "Are USB devices allowed?"]),
    ("personal_device",
     "You can use mail, HaldenDrive and chat on a personal computer at work.halden.example. Internal systems "
     "need a company laptop connected to the VPN.",
     ["Can I work from my home computer?", "How do I check work email from my own PC?", "personal device",
      "Can I use my own laptop for work?", "Can I put the VPN on my personal computer?",
      "What can I access from a personal device?", "how do i get to my files on my home pc",
      "Can I reach internal tools without a company laptop?", "What is work.halden.example?",
      "My work laptop is broken, can I use my own?"]),
    ("profile_update",
     "Change your phone number and desk at id.halden.example > Profile. A new name or job title comes from "
     "HR, and your email address follows within 1 working day.",
     ["How do I change my name in the directory?", "My job title is wrong in Outlook", "profile",
      "How do I update my phone number?", "I got married, can my email address change?",
      "Where do I change my desk location?", "how do i update my details in the address book",
      "Who changes my job title?", "My email still shows my old name",
      "How long until my new name shows up?"]),
]


def make_rows() -> tuple[list[dict], list[dict]]:
    """The train and eval rows, the same on every call (seeded)."""
    return qa_data.make_rows(INTENTS, SYSTEM_PROMPT, names=NAMES)


if __name__ == "__main__":
    qa_data.write(HERE / "data", *make_rows())
