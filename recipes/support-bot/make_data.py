"""Write the support-bot dataset: data/train.jsonl and data/eval.jsonl (OpenAI chat fine-tuning format).

A customer-support assistant for "Nimbus Notes", a fictional note-taking SaaS. Each intent has ONE
canonical answer and ten hand-written user questions. Eval holds out one or two of those questions per
intent; train gets the rest plus a few style variants (casing, greetings, typos) of its own questions, so
the two files share intents and answers but never a question. About 10% of train rows are two-turn chats.
The construction is shared with the other Q&A recipes (it-helpdesk, bike-shop) in ../_qa_data.py.

Deterministic (seeded); run by hand from anywhere:  python recipes/support-bot/make_data.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qa_data)

SYSTEM_PROMPT = "You are the support assistant for Nimbus Notes. Answer briefly and accurately."

# (intent, canonical answer, user questions). Answers stay short and concrete so a tiny model can learn them.
INTENTS: list[tuple[str, str, list[str]]] = [
    ("reset_password",
     "Click \"Forgot password\" on the sign-in page and enter your account email. The reset link we send is "
     "valid for 30 minutes.",
     ["How do I reset my password?", "I forgot my password",
      "How can I change my password if I can't log in?", "password reset please",
      "I can't remember my password, what do I do?", "Where do I reset my pasword?",
      "Can you help me get a new password?", "my password doesn't work anymore, how do i reset it",
      "What's the way to recover a forgotten password?", "Need to reset the password on my Nimbus account"]),
    ("change_email",
     "Go to Settings > Account > Email, enter the new address and your password, then click the confirmation "
     "link we send to the new address.",
     ["How do I change my email address?", "I want to use a different email for my account",
      "Can I update the email on my account?", "how to change login email",
      "My email changed, how do I update it in Nimbus?", "Where can I edit my account email?",
      "change my e-mail address please", "I need to switch my account to a new emial",
      "Is it possible to change the email I signed up with?",
      "How can I move my account to another email address?"]),
    ("enable_2fa",
     "Go to Settings > Security > Two-factor authentication, click Enable, scan the QR code with an "
     "authenticator app and enter the 6-digit code.",
     ["How do I turn on two-factor authentication?", "How can I enable 2FA?",
      "Do you support two factor authentication?", "I want to add an extra layer of security to my account",
      "set up 2fa", "Where is the setting for two-step verification?",
      "Can I use Google Authenticator with Nimbus?",
      "how do i make my account more secure with a code from my phone",
      "Enable two-factor auth on my account please", "Is there 2-step login?"]),
    ("lost_2fa_device",
     "Sign in with one of your recovery codes. Without a recovery code, email support@nimbusnotes.example "
     "from your account address and we will verify your identity within 3 business days.",
     ["I lost my phone and can't get my 2FA code", "My authenticator app was deleted, how do I log in?",
      "I got a new phone and my two-factor codes are gone", "Locked out because of 2FA", "lost 2fa device",
      "How do I sign in without my authentication app?", "I don't have access to my 2FA codes anymore",
      "My phone broke and I can't log in with two-factor", "what if i lose the device i use for 2fa",
      "Can't get past the two-factor screen, help"]),
    ("cancel_subscription",
     "Open Settings > Billing and click \"Cancel plan\". Your plan stays active until the end of the current "
     "billing period and will not renew.",
     ["How do I cancel my subscription?", "I want to cancel my plan", "How can I stop my subscription from "
                                                                      "renewing?",
      "cancel subscription", "Please cancel my Nimbus Plus plan", "Where do I turn off auto-renewal?",
      "I'd like to end my paid plan", "How to unsubscribe from the paid "
                                      "plan?", "how do i cancell my subscripton",
      "Can I cancel anytime?"]),
    ("refund_policy",
     "New paid subscriptions can be refunded in full within 14 days of purchase. After 14 days we don't give "
     "partial refunds, but you keep access until the period ends.",
     ["What is your refund policy?", "Can I get a refund?", "I want my money back", "Do you offer refunds?",
      "I was charged for a year, can I get refunded?", "refund please", "How many days do I have to ask for "
                                                                        "a refund?",
      "Is it possible to get a partial refund?", "i paid by mistake can i get a "
                                                 "refund", "What happens if I want a refund after a month?"]),
    ("pricing_tiers",
     "Free costs $0 for up to 3 devices and 1 GB. Plus is $6 per month with unlimited devices and 50 GB. "
     "Team is $10 per user per month with shared workspaces and admin controls.",
     ["What plans do you have?", "How much does Nimbus cost?", "What are the pricing tiers?", "pricing",
      "What's the difference between Free, Plus and Team?", "How much is the Plus "
                                                            "plan?", "Can you tell me your prices?",
      "how much does the team plan cost per user", "Which plans are available and what do they include?",
      "what does a paid plan cost"]),
    ("upgrade_plan",
     "Open Settings > Billing, click \"Upgrade\" and choose a plan. The upgrade applies immediately and you "
     "only pay the prorated difference for this period.",
     ["How do I upgrade to Plus?", "I want to upgrade my plan", "How can I switch from Free to a paid plan?",
      "upgrade account", "Where do I buy the Plus plan?", "How do I move to the Team plan?",
      "Can I upgrade in the middle of the month?", "I'd like more features, how do I upgrade?",
      "how to get nimbus plus", "Upgrade my subscription "
                                "please"]),
    ("downgrade_plan",
     "The owner can change plans in Settings > Billing > Change plan. The lower price starts at the next "
     "billing period, and notes over the new storage limit become read-only.",
     ["How do I downgrade my plan?", "I want to go from Team to Plus", "Can I switch to a cheaper plan?",
      "downgrade to free", "How do I move back to the Free plan?", "What happens to my notes if I downgrade?",
      "I'd like a smaller plan", "how can i change to a lower plan", "Is it possible to downgrade my "
                                                                     "subscription?",
      "Switch my account from Plus to Free"]),
    ("invoices",
     "All invoices are in Settings > Billing > Invoices. Click an invoice to download it as a PDF.",
     ["Where can I find my invoices?", "How do I download an invoice?", "I need a receipt for my payment",
      "invoice", "Can you send me last month's invoice?", "Where are my billing "
                                                          "receipts?", "How do I get a PDF invoice?",
      "i need the invoice for my accountant", "Where do I see my past "
                                              "payments?", "Can I download all my receipts?"]),
    ("billing_details",
     "Edit your company name, address and VAT number in Settings > Billing > Billing profile. Changes appear "
     "on future invoices; past invoices can be reissued by support.",
     ["How do I add my VAT number to invoices?", "I need my company name on the "
                                                 "invoice", "How do I change my billing address?",
      "update billing address", "Can I put a tax ID on my receipts?", "Where do I edit billing details?",
      "The address on my invoice is wrong", "how do i add company info to the invoice",
      "Can you reissue an invoice with my business name?", "Change the billing info on my account"]),
    ("payment_methods",
     "We accept Visa, Mastercard, American Express and PayPal. Yearly Team plans can also be paid by bank "
     "transfer.",
     ["What payment methods do you accept?", "Can I pay with PayPal?", "Do you take American Express?",
      "payment options", "Can I pay by bank transfer?", "Which credit cards "
                                                        "work?", "Do you accept debit cards?",
      "how can i pay for nimbus", "Is it possible to pay with something other than a "
                                  "card?", "Can I pay by invoice?"]),
    ("card_declined",
     "Check the card number, expiry date and billing address, then try again. If it still fails, your bank "
     "may be blocking online payments, so contact them or use another card.",
     ["My card was declined", "Why won't my payment go through?", "Payment failed, what should I do?",
      "card declined", "I can't pay, it says the card was rejected", "Why does my credit card keep failing?",
      "The checkout says payment error", "my card isnt working for the "
                                         "upgrade", "Transaction declined when I tried to subscribe",
      "I keep getting a payment failed message"]),
    ("student_discount",
     "Students and teachers get 50% off Plus with a school email address, and registered nonprofits get 30% "
     "off Team. Apply at Settings > Billing > Discounts.",
     ["Do you have a student discount?", "Is there a discount for "
                                         "nonprofits?", "I'm a teacher, do I get a discount?",
      "student pricing", "Are there any discounts?", "Can I get Plus cheaper as a "
                                                     "student?", "Do you offer education pricing?",
      "we are a charity, is there a reduced price", "How do I apply for the student "
                                                    "discount?", "any deals for students?"]),
    ("free_trial",
     "Plus and Team come with a 14-day free trial, and no credit card is needed. When the trial ends, your "
     "account moves to the Free plan and your notes are kept.",
     ["Is there a free trial?", "Can I try Plus before paying?", "How long is the trial?", "free trial",
      "What happens when my trial ends?", "Do I need a credit card for the "
                                          "trial?", "Can I test the Team plan for free?",
      "will i lose my notes after the trial", "How do I start a trial?", "Is the trial really free?"]),
    ("sync_issues",
     "Make sure every device is online and signed in to the same account, then click Settings > Sync > Sync "
     "now. If a note is still missing, update the app and sign out and back in.",
     ["My notes are not syncing", "Notes don't show up on my phone", "Sync isn't working",
      "why are my devices not in sync", "I edited a note on my laptop but my phone shows the old version",
      "sync problem", "My notes disappeared on one device", "How do I force a "
                                                            "sync?", "notes not updating between devices",
      "Changes I make don't appear on my other computer"]),
    ("offline_mode",
     "Yes. You can read and edit notes offline; changes are saved on the device and sync the next time you "
     "connect. If a note changed on two devices, both versions are kept.",
     ["Does Nimbus work offline?", "Can I edit notes without internet?", "Is there an offline "
                                                                         "mode?", "offline",
      "What happens if I lose my connection while writing?", "Can I use the app on a plane?",
      "Will my notes be available without wifi?", "does it work with no internet connection",
      "Do offline changes get saved?", "Can I access my notes when I'm offline?"]),
    ("share_note",
     "Open the note, click Share in the top right, enter the person's email and choose Can view or Can edit. "
     "You can remove access from the same menu.",
     ["How do I share a note?", "Can I share a note with a friend?", "How do I give someone edit access?",
      "share note", "Can I let someone view a note without editing?", "How do I collaborate on a note?",
      "how can i send a note to my coworker", "How do I stop sharing a "
                                              "note?", "Can other people edit my notes?",
      "I want to share my shopping list with my wife"]),
    ("storage_limits",
     "Free includes 1 GB of storage, Plus 50 GB and Team 200 GB per member. Attachments count toward the "
     "limit; see your usage in Settings > Storage.",
     ["How much storage do I get?", "What is the storage limit?", "My storage is full, what can I do?",
      "storage", "How many GB does Plus include?", "How do I check how much space I'm using?",
      "Is there a limit on storage?", "how much space does the free plan "
                                      "have", "Do attachments count toward storage?",
      "I ran out of space"]),
    ("attachment_size",
     "A single attachment can be up to 25 MB on Free and up to 250 MB on Plus and Team.",
     ["What is the maximum file size?", "How big can attachments be?", "I can't upload a large PDF",
      "file too large error", "Is there a size limit for uploads?", "Can I attach a 100 MB video?",
      "What's the biggest file I can add to a note?", "error E203 when "
                                                      "uploading", "why cant i upload my file, it's too big",
      "Upload limit for attachments?"]),
    ("export_notes",
     "Go to Settings > Data > Export and choose Markdown, HTML or JSON. Large exports are prepared in the "
     "background and we email you a download link.",
     ["How do I export my notes?", "Can I download all my notes?", "How do I back up my data?", "export",
      "I want to save my notes as Markdown", "Is there a way to export "
                                             "everything?", "How can I get a copy of all my notes?",
      "export notes to pdf or html", "Can I take my data with me if I leave?", "how to export my notebook"]),
    ("import_notes",
     "Go to Settings > Data > Import and pick the source: a Markdown folder, HTML files, plain text or an "
     "export from another notes app.",
     ["How do I import notes?", "Can I bring my notes from another app?", "How do I import Markdown files?",
      "import", "I want to move my notes from Evernote", "Can I upload a folder of text files as notes?",
      "How do I migrate to Nimbus?", "import my old notes please", "Does Nimbus support importing from other "
                                                                   "apps?",
      "Can I import an HTML export?"]),
    ("delete_account",
     "Open Settings > Account > Delete account and confirm your password. Everything is deleted after 30 "
     "days; sign in before then to cancel the deletion.",
     ["How do I delete my account?", "I want to close my account", "Please delete my account and data",
      "delete account", "How can I remove my Nimbus account permanently?", "Can I erase all my data?",
      "how to deactivate my account", "I no longer want to use Nimbus, how do I delete everything?",
      "Can I undo deleting my account?", "Remove my profile please"]),
    ("team_seats",
     "Team owners and admins can add people in Settings > Team > Members > Invite. Each member is one seat "
     "at $10 per month, and removed seats are credited on your next invoice.",
     ["How do I add people to my team?", "How do I invite a colleague?", "How do seats "
                                                                         "work?", "add team member",
      "Can I remove someone from my team?", "How much does an extra seat "
                                            "cost?", "We hired someone, how do they join our workspace?",
      "will our bill go down if we remove users", "How many seats do I "
                                                  "have?", "invite users to my workspace"]),
    ("transfer_ownership",
     "The owner opens Settings > Team > Members, clicks the menu next to a member and chooses \"Make "
     "owner\". The new owner accepts by email and you become an admin.",
     ["How do I transfer ownership of the workspace?", "I'm leaving the company, how do I hand over the "
                                                       "account?",
      "Can I make someone else the owner?", "change workspace owner", "How do I give admin rights to another "
                                                                      "person?",
      "Our owner left, how do we get ownership?", "transfer team ownership", "Can there be two owners?",
      "how do i pass the owner role to my colleague", "How do I become the owner of our team?"]),
    ("sso",
     "Single sign-on is available on the Team plan. An admin connects your identity provider in Settings > "
     "Security > Single sign-on, then members sign in with their work account.",
     ["Do you support SSO?", "Can we log in with Okta?", "How do I set up single sign-on?", "sso",
      "Can our employees sign in with their company "
      "account?", "Is SAML supported?", "Does Nimbus work with Azure AD login?",
      "how do i turn on sso for my team", "Which plan has single sign-on?", "Can we enforce company login "
                                                                            "for everyone?"]),
    ("api_keys",
     "Go to Settings > Developer > API keys and click \"New key\". The key is shown only once, so copy it "
     "right away; you can revoke it at any time.",
     ["How do I create an API key?", "Where do I get an API token?", "Do you have an API?", "api key",
      "How do I revoke an API key?", "I lost my API key, can I see it "
                                     "again?", "How can I access my notes programmatically?",
      "where is the developer settings page", "Can I generate a key for the Nimbus "
                                              "API?", "How do I get API access?"]),
    ("api_rate_limits",
     "Each API key can make 60 requests per minute and 10,000 requests per day. Contact support if you need "
     "a higher limit.",
     ["What are the API rate limits?", "How many API requests can I make?", "I'm getting error 429 from the "
                                                                            "API",
      "api limits", "Is there a request limit per minute?", "Can I get a higher API limit?",
      "how many calls per day does the api allow", "Why is the API blocking my "
                                                   "requests?", "What's the API quota?",
      "too many requests error"]),
    ("restore_deleted_note",
     "Deleted notes stay in the Trash for 30 days. Open Trash in the sidebar, select the note and click "
     "Restore.",
     ["How do I recover a deleted note?", "I deleted a note by mistake", "Where is the "
                                                                         "trash?", "restore note",
      "Can I get back a note I deleted last week?", "How long are deleted notes kept?", "undo delete note",
      "I accidentally removed a whole folder", "where do deleted notes go", "Can deleted notes be "
                                                                            "recovered?"]),
    ("version_history",
     "On Plus and Team, open the note and choose History from the menu. You can view and restore any version "
     "from the last 90 days.",
     ["Can I see older versions of a note?", "How do I restore a previous "
                                             "version?", "Is there version history?",
      "note history", "I overwrote my note, can I go back?", "How far back does version history go?",
      "How do I undo changes from yesterday?", "does the free plan have version "
                                               "history", "Where do I find past edits of a note?",
      "Can I compare old versions of a note?"]),
    ("device_limit",
     "The Free plan works on up to 3 devices at the same time. Plus and Team have no device limit.",
     ["How many devices can I use?", "Can I use Nimbus on my phone and laptop?", "Is there a device limit?",
      "device limit", "It says I've reached the maximum number of devices", "Can I install it on 5 "
                                                                            "computers?",
      "how many phones can i log in on", "Why can't I sign in on my tablet?", "Do I need Plus for more "
                                                                              "devices?",
      "How do I remove an old device?"]),
    ("supported_platforms",
     "Nimbus Notes has apps for Windows, macOS, Linux, iOS and Android, and a web app that runs in current "
     "Chrome, Firefox, Safari and Edge.",
     ["What platforms do you support?", "Is there a Mac app?", "Do you have an Android app?", "platforms",
      "Can I use Nimbus on Linux?", "Is there a desktop app?", "Does it work in the browser?",
      "is there an ipad version", "Which operating systems are supported?", "Do you have a Windows app?"]),
    ("data_encryption",
     "Yes. Your data is encrypted in transit with TLS and at rest with AES-256, including backups. Staff "
     "access to production is limited and logged.",
     ["Is my data encrypted?", "How secure are my notes?", "Do you use encryption?", "security",
      "Can your employees read my notes?", "Are backups encrypted?", "What encryption do you use?",
      "is nimbus safe for private stuff", "How do you protect my data?", "Are my notes stored securely?"]),
    ("data_location",
     "Team workspaces choose EU or US storage when they are created. Personal accounts are stored in the "
     "region closest to where you signed up. We never sell your data.",
     ["Where is my data stored?", "Do you store data in the EU?", "Is Nimbus GDPR "
                                                                  "compliant?", "data location",
      "Which country are your servers in?", "Can we keep our team's data in Europe?", "Do you sell my data?",
      "where are the servers", "Can I choose where my data is hosted?", "Is my data kept in the US?"]),
    ("lock_note",
     "Open the note and choose \"Lock note\" from the menu, then set a password. Locked notes are encrypted "
     "on your device, and we cannot recover a forgotten note password.",
     ["Can I password protect a note?", "How do I lock a note?", "Can I hide a private note?", "lock note",
      "Is there a way to encrypt one note?", "I forgot the password for my locked "
                                             "note", "How do I make a note private with a password?",
      "can i put a pin on a note", "How do I unlock a locked note?", "Protect a single note with a "
                                                                     "password"]),
    ("change_language",
     "Go to Settings > General > Language and pick a language. The app restarts to apply it.",
     ["How do I change the language?", "Can I use Nimbus in Spanish?", "The app is in the wrong language",
      "language", "How do I switch the app to German?", "Where is the language setting?",
      "what languages are available", "Change the interface language please", "Can I set the app to French?",
      "the menus are not in english, how do i fix that"]),
    ("dark_mode",
     "Go to Settings > Appearance > Theme and choose Light, Dark or System. System follows your device's "
     "setting.",
     ["Is there a dark mode?", "How do I turn on dark mode?", "Can I change the theme?", "dark mode",
      "The app is too bright at night", "How do I switch back to the light "
                                        "theme?", "does nimbus have a night mode",
      "Where is the appearance setting?", "Can the theme follow my system "
                                          "setting?", "How do I make the background black?"]),
    ("notifications",
     "Go to Settings > Notifications to turn email and push notifications on or off, or to be notified only "
     "when someone mentions you.",
     ["How do I turn off notifications?", "I get too many emails from "
                                          "Nimbus", "How do I stop push notifications?",
      "notifications", "Can I only get notified when I'm mentioned?", "How do I turn on notifications?",
      "stop sending me emails", "Where are the notification settings?", "Why am I not getting notifications?",
      "Can I mute notifications for shared notes?"]),
    ("contact_support",
     "Use Help > Contact us in the app or email support@nimbusnotes.example. A person answers Monday to "
     "Friday, 8:00 to 18:00 UTC, usually within a few hours.",
     ["How do I contact support?", "Can I talk to a human?", "What are your support hours?", "contact",
      "Is there a phone number I can call?", "How do I reach customer service?", "I need to speak to someone",
      "what's your support email", "When is support available?", "How long does support take to reply?"]),
    ("app_crash",
     "Update Nimbus to the latest version and restart your device. If it still crashes, reinstall the app "
     "(your notes are safe in your account) and send a report from Settings > Help > Send diagnostics.",
     ["The app keeps crashing", "Nimbus closes as soon as I open it", "The app freezes", "crash",
      "Why does the app crash on my phone?", "Nimbus won't open", "The app is stuck on the loading screen",
      "app crashes when i open a big note", "What do I do if the app keeps "
                                            "closing?", "Nimbus stopped working after the update"]),
]


def make_rows() -> tuple[list[dict], list[dict]]:
    """The train and eval rows, the same on every call (seeded)."""
    return qa_data.make_rows(INTENTS, SYSTEM_PROMPT, names=("Nimbus",))


if __name__ == "__main__":
    qa_data.write(HERE / "data", *make_rows())
