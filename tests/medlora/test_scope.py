"""medlora/scope.py: the decline and referral rule, on hand-labelled answers and on the training answers."""

import json
from collections import Counter
from pathlib import Path

import pytest

from medlora.scope import is_clinician_referral, is_decline, is_emergency_referral, is_referral, opening

TRAINING_PATH = Path(__file__).resolve().parents[2] / "data" / "medical_flashcards.jsonl"

DECLINE, EMERGENCY, CLINICIAN = "decline", "emergency", "clinician"

# Hand-labelled answers: (answer, the labels it should get). An empty set means none of the three.
LABELLED_ANSWERS = [
    # -- declines, in the contract's markers and in other words
    ("Tax law is outside my scope. I can help with medical and health questions.", {DECLINE}),
    ("I'm sorry, that's beyond my scope: I answer questions about medicine and health.", {DECLINE}),
    ("That question is outside the scope of this medical assistant.", {DECLINE}),
    ("Football trivia is outside what I can help with, but ask me anything about health.", {DECLINE}),
    ("I can only help with medical questions, so I'll pass on the chess puzzle.", {DECLINE}),
    ("Sorry! I can only help with health topics such as sleep, diet or symptoms.", {DECLINE}),
    ("I only answer medical questions. Try a travel site for train times.", {DECLINE}),
    ("I only answer health questions, not ones about knitting.", {DECLINE}),
    ("I can only answer medical questions; a mortgage adviser can help with that.", {DECLINE}),
    ("I can only answer health questions, sorry.", {DECLINE}),
    ("Writing a sonnet is not something I can help with. Ask me about medicine instead.", {DECLINE}),
    ("I can't help with tax questions, I only answer medical and health questions", {DECLINE}),
    ("I answer questions about human health, so your cat's vaccinations are outside my scope. "
     "Please ask a veterinarian.", {DECLINE}),
    ("Programming is outside my area of expertise as a medical assistant.", {DECLINE}),
    ("That history question is outside the medical topics I cover.", {DECLINE}),
    ("Tipping customs lie outside the scope of what I do. I'm a medical Q&A assistant.", {DECLINE}),
    ("Art history is outside the scope of the medical domain I cover.", {DECLINE}),
    ("Gardening is not my specialty; I am a medical question-answering assistant.", {DECLINE}),
    ("Unfortunately that isn't something I\u2019m able to answer. I focus on medicine.", {DECLINE}),
    ("I'm only able to help with questions about health and medicine.", {DECLINE}),
    ("THAT IS OUTSIDE MY SCOPE.", {DECLINE}),
    ("Sorry, I'm designed to answer medical questions, not to plan holidays.", {DECLINE}),
    ("Legal advice is beyond the scope of what I can answer; I'm a medical question-answering assistant.",
     {DECLINE}),
    # -- tricky negatives: medical answers with scope-like words
    ("A potassium level outside the normal range can cause arrhythmias.", set()),
    ("Sodium is pumped outside the cell by the Na+/K+-ATPase.", set()),
    ("Complex cases are beyond the scope of primary care; refer to a specialist.", set()),
    ("A full differential is beyond the scope of this flashcard.", set()),
    ("I can only guess without more detail, but the commonest cause is a viral infection.", set()),
    ("Pain on the outside of the knee often comes from the iliotibial band.", set()),
    ("This is not outside my scope: hypertension is a medical topic.", set()),
    ("Some deformities are beyond the scope of medical treatment alone and need surgery.", set()),
    ("The scope of practice of nurse prescribers differs between countries.", set()),
    ("Metformin only helps with blood glucose control in type 2 diabetes, not weight loss alone.", set()),
    # -- emergency referrals
    ("Call your local emergency number now. Chew an aspirin if you are not allergic.", {EMERGENCY}),
    ("Call 911 right away and keep the person still.", {EMERGENCY}),
    ("Dial 112 or 999 immediately.", {EMERGENCY}),
    ("Have someone call an ambulance while you press on the wound.", {EMERGENCY}),
    ("Go straight to the nearest emergency department.", {EMERGENCY}),
    ("Please go to the ER now.", {EMERGENCY}),
    ("Seek emergency medical care immediately: these are signs of a stroke.", {EMERGENCY}),
    ("Don't hesitate to call emergency services if the swelling spreads.", {EMERGENCY}),
    ("Call your local emergency number now. You can also call or text 988 to reach a crisis line.", {EMERGENCY}),
    ("Call poison control or your local emergency number straight away.", {EMERGENCY}),
    # -- emergency departments mentioned in passing, or negated
    ("She was seen in the emergency department, where a CT scan showed a bleed.", set()),
    ("Emergency room visits for asthma peak in September.", set()),
    ("For a mild cold you do not need to call 911.", set()),
    ("There is no need to go to the emergency room for a small splinter.", set()),
    ("Paramedics from emergency services give adrenaline for anaphylaxis.", set()),
    # -- clinician referrals
    ("Ibuprofen is usually taken every 6 to 8 hours; for your own dose, ask your clinician or pharmacist.",
     {CLINICIAN}),
    ("Please talk to your doctor before changing the dose.", {CLINICIAN}),
    ("Check with your pharmacist whether it interacts with your other medicines.", {CLINICIAN}),
    ("See a GP if the rash has not gone in two weeks.", {CLINICIAN}),
    ("Get checked by a doctor to confirm the diagnosis.", {CLINICIAN}),
    ("If it persists, seek medical advice.", {CLINICIAN}),
    ("Your doctor may order an ECG and blood tests.", set()),
    ("I can only help with general health information, so for your exact dose ask your clinician or pharmacist.",
     {CLINICIAN}),
    ("Your exact dose is beyond the scope of what I can advise; ask your clinician or pharmacist.", {CLINICIAN}),
    ("I'm here to help with general health information; for your own dose, talk to your pharmacist.", {CLINICIAN}),
    ("You don't need to see a doctor for a simple bruise.", set()),
    # -- both
    ("Call your local emergency number now; afterwards, ask your clinician or pharmacist about the dose.",
     {EMERGENCY, CLINICIAN}),
    ("Call 911 now. Afterwards, ask your doctor about the dose.", {EMERGENCY, CLINICIAN}),
    # -- where in the answer: a decline or an emergency referral comes first (after at most an apology)
    ("Canberra is the capital. That said, geography is outside my scope.", set()),
    ("Hypertension is a blood pressure that stays at or above 130/80 mm Hg. Insurance questions are "
     "outside my scope, but exercise, less salt and medicines all lower it.", set()),
    ("It is probably heartburn... if it is still there tomorrow, call 911.", set()),
    ("It sounds like a sprain.\nIf the pain gets much worse, go to the ER.", set()),
    ("Sorry! That is outside my scope. Ask me about health instead.", {DECLINE}),
    ("I'm sorry. I can't help with that. Tax law is outside my scope.", {DECLINE}),
    ("I'm so sorry you are going through this. Please call or text 988 now to reach a crisis line.", {EMERGENCY}),
    ("1. Call 911. 2. Keep the person still and warm.", {EMERGENCY}),
    ("For a suspected stroke, e.g. a drooping face, call 911 now.", {EMERGENCY}),
    ("Ibuprofen eases pain and swelling. For your own dose, ask your clinician or pharmacist.", {CLINICIAN}),
    # -- negated referrals
    ("There is no reason to call 911", set()),
    ("There's no reason to go to the emergency room for a mild sunburn.", set()),
]


@pytest.mark.parametrize(("answer", "labels"), LABELLED_ANSWERS)
def test_labelled_answers(answer, labels):
    got = {
        label
        for label, rule in ((DECLINE, is_decline), (EMERGENCY, is_emergency_referral), (CLINICIAN, is_clinician_referral))
        if rule(answer)
    }
    assert got == labels


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Sorry! That is outside my scope. Ask me about health.", "sorry! that is outside my scope."),
        ("Canberra is the capital. That said, geography is outside my scope.", "canberra is the capital."),
        ("I'm sorry.  I can\u2019t help with that.\n\nPlease ask a vet.", "i'm sorry. i can't help with that. please ask a vet."),
        ("1. Call 911. 2. Stay still.", "1. call 911."),
        ("", ""),
    ],
)
def test_opening_is_the_first_sentence_after_any_apology(answer, expected):
    assert opening(answer) == expected


def test_enough_labelled_answers_of_each_label():
    counts = Counter(label for _, labels in LABELLED_ANSWERS for label in labels or {"none"})
    assert len(LABELLED_ANSWERS) >= 40
    assert min(counts[DECLINE], counts[EMERGENCY], counts[CLINICIAN], counts["none"]) >= 5


def test_is_referral_by_kind():
    emergency = "Call your local emergency number now."
    clinician = "For your own dose, ask your clinician or pharmacist."
    assert is_referral(emergency, "emergency") and not is_referral(clinician, "emergency")
    assert is_referral(clinician, "personal_dose") and is_referral(emergency, "personal_dose")
    assert not is_referral("Take two tablets.", "personal_dose")
    with pytest.raises(ValueError, match="referral kind 'medical' is not one of emergency, personal_dose"):
        is_referral(clinician, "medical")


# ---- training rows under the rule ----------------------------------------------------------


def _training_rows():
    with TRAINING_PATH.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def test_training_answers_follow_the_rule():
    """Out-of-domain answers are declines, no other answer is; safety answers refer the user on."""
    rows = _training_rows()
    ood_rows = [row for row in rows if row["topic"] == "out_of_domain"]
    assert len(ood_rows) >= 40
    assert not [row["output"] for row in ood_rows if not is_decline(row["output"])]
    assert not [row["output"] for row in rows if row["topic"] != "out_of_domain" and is_decline(row["output"])]
    assert not [
        row["output"]
        for row in rows
        if row["topic"] == "safety" and not (is_emergency_referral(row["output"]) or is_clinician_referral(row["output"]))
    ]

