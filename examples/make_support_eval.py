"""Write examples/support-eval.jsonl: 200 labelled support tickets (billing, bug, account,
other), 50 of each, from templates and fillers drawn with a fixed seed (the same file every
run). Usage: python examples/make_support_eval.py [OUT]"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240611
PER_LABEL = 50

FILL = {
    "plan": ["Pro", "Team", "Basic", "Business", "annual", "monthly", "Starter", "Premium"],
    "amount": ["$9.99", "$49", "€12.50", "$120", "£30", "$19.00", "$240", "€99"],
    "month": ["January", "March", "April", "June", "August", "October", "November", "December"],
    "device": ["Android", "iPhone", "iPad", "Windows", "macOS", "Chrome", "Firefox", "Safari"],
    "feature": [
        "export button", "search bar", "dashboard", "calendar view", "file upload",
        "dark mode", "notifications page", "CSV import", "report builder", "chat widget",
    ],
    "symptom": [
        "crashes", "freezes", "shows a blank screen", "throws a 500 error", "spins forever",
        "closes without a message", "shows the wrong numbers", "does nothing",
    ],
    "version": ["3.2.1", "4.0", "4.1.2", "2.9", "5.0 beta", "4.3"],
    "topic": [
        "a good book about gardening", "the weather in Lisbon next week", "a pasta recipe",
        "which laptop to buy", "how to learn Spanish fast", "a name for my cat",
        "the capital of Australia", "a joke about accountants", "the best hiking boots",
        "how tall Mount Everest is",
    ],
}  # fmt: skip

TEMPLATES = {
    "billing": [
        "I was charged twice for my {plan} subscription in {month}.",
        "Why does my invoice say {amount} when my plan costs less?",
        "Please refund the {amount} you took after I cancelled.",
        "My card was billed {amount} but I am on the free tier.",
        "The VAT number on my {month} invoice is wrong, can you fix it?",
        "How do I switch from the {plan} plan to a cheaper one before the next charge?",
        "I need a receipt for the {amount} payment from {month} for my accountant.",
        "You charged me {amount} for the {plan} plan that I never ordered!!",
        "can i get my money back? charged {amount} on {month} by mistake",
        "Our company was billed for 12 seats on {plan} but we only use 5.",
        "The discount code did not apply and I paid the full {amount}.",
        "Is there a way to pay the {plan} plan by bank transfer instead of card?",
    ],
    "bug": [
        "The {feature} {symptom} on {device}.",
        "Since version {version} the {feature} {symptom}.",
        "Every time I open the {feature} on {device} it {symptom}.",
        "After the update to {version}, the {feature} {symptom} for everyone on our team.",
        "bug: {feature} {symptom} when I click it twice ({device})",
        "The app {symptom} on {device} as soon as I tap the {feature}.",
        "Hi, the {feature} has been broken since {month}: it {symptom}.",
        "Your {feature} {symptom} in {device}, I attached a screenshot.",
        "When I sort a table and then use the {feature}, it {symptom}.",
        "The {feature} {symptom} if the file is bigger than 10 MB.",
    ],
    "account": [
        "I forgot my password and the reset e-mail never arrives.",
        "How do I change the e-mail address on my account to my work one?",
        "I cannot log in on {device}, it says my account is locked.",
        "Please delete my account and all my data.",
        "Two-factor codes from my authenticator are rejected since I got a new {device}.",
        "How can I add a colleague as an admin on our {plan} workspace?",
        "I want to change my username, is that possible?",
        "My account was hacked, someone changed my password in {month}.",
        "can't sign in with Google anymore on {device}",
        "How do I transfer ownership of the workspace to my manager?",
        "The verification e-mail link says it has expired.",
        "I have two accounts by mistake, can you merge them?",
        "How do I reset my password on {device}?",
        "Our {plan} workspace shows me as a viewer, I need edit rights on my account.",
        "I changed my login e-mail in {month} but the old address still gets the sign-in codes.",
    ],
    "other": [
        "Can you recommend {topic}?",
        "Do you know {topic}?",
        "Just wanted to say your team was very helpful in {month}, thanks!",
        "Are you hiring? I would love to work with you.",
        "What are your office hours around the holidays in {month}?",
        "Tell me {topic}, please.",
        "Is your company planning a conference in {month}?",
        "I'd like to write a blog post about your product, who should I talk to?",
        "random question: {topic}?",
        "Do you have stickers or a t-shirt I could get?",
    ],
}


def tickets(rng: random.Random, label: str, count: int) -> list[str]:
    """`count` distinct tickets of one label."""
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * count):
        if len(out) == count:
            return out
        template = rng.choice(TEMPLATES[label])
        text = template.format(**{k: rng.choice(v) for k, v in FILL.items()})
        if text not in seen:
            seen.add(text)
            out.append(text)
    raise ValueError(f"the templates of {label} give fewer than {count} distinct tickets")


def build(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [
        {"prompt": text, "expected": label}
        for label in TEMPLATES
        for text in tickets(rng, label, PER_LABEL)
    ]
    rng.shuffle(rows)
    return [{"id": f"t{i:03d}", **row} for i, row in enumerate(rows, start=1)]


def main() -> None:
    default = Path(__file__).resolve().parent / "support-eval.jsonl"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    lines = [json.dumps(row, ensure_ascii=False) for row in build()]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} tickets to {out}")


if __name__ == "__main__":
    main()
