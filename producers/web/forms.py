"""The registrars' forms: which questions each event's form asks, how the answers
become a submission (``producers.requests``), and how that submission's
validation errors become GOV.UK error messages beside the questions.

A question's ``name`` is the dotted path of its value in the submission
(``deceased.given_names``, ``last_address.lines.0``, ``parents.1.nino``), so an
error the submission model reports at a path lands on the question with that
name. Dates are GOV.UK date inputs, posted as ``<name>-day``, ``-month`` and
``-year``. Answers are kept as the strings the registrar typed, so a page shown
again shows exactly what was entered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from pydantic import ValidationError

from producers.accounts import Submitter
from producers.requests import AddressChange, BirthRegistration, DeathRegistration, Submission

QuestionKind = Literal["text", "date", "choice"]
DATE_PARTS = ("day", "month", "year")
MONTHS = ("January February March April May June July August September October November December").split()


@dataclass(frozen=True)
class Question:
    name: str  # the dotted path of the answer in the submission
    label: str
    about: str  # how a message names it: "the deceased's given names"
    kind: QuestionKind = "text"
    required: bool = True
    hint: str | None = None
    width: str | None = None  # a GOV.UK width class
    choices: tuple[tuple[str, str], ...] = ()  # (value, label)
    example: str | None = None  # a valid value, for the wrong-format message
    numeric: bool = False

    @property
    def id(self) -> str:
        return self.name.replace(".", "-").replace("_", "-")

    @property
    def anchor(self) -> str:
        """Where the error summary's link goes: the first input of the question."""
        return f"{self.id}-day" if self.kind == "date" else self.id

    def posted_names(self) -> tuple[str, ...]:
        if self.kind == "date":
            return tuple(f"{self.name}-{part}" for part in DATE_PARTS)
        return (self.name,)


@dataclass(frozen=True)
class Section:
    title: str
    questions: tuple[Question, ...]
    # An optional part of the submission (a surviving partner, a second parent):
    # left out when every one of its questions is blank.
    optional: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class FieldError:
    message: str
    question: Question | None  # None: about the form as a whole
    href: str

    @property
    def name(self) -> str | None:
        return self.question.name if self.question else None


@dataclass(frozen=True)
class SummaryRow:
    label: str
    value: str
    change_href: str
    about: str


@dataclass(frozen=True)
class SummarySection:
    title: str
    rows: tuple[SummaryRow, ...]
    left_out: bool  # an optional part with no answers
    add_href: str  # where to answer it after all


@dataclass(frozen=True)
class RegistrationForm:
    slug: str
    model: type[Submission]
    title: str
    noun: str  # "death registration"
    sections: tuple[Section, ...]
    # Rules about a whole part of the submission, reported at that part's path:
    # the question to show the message on, and the message.
    whole_part_rules: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def event_type(self) -> str:
        return self.model.event_type

    @property
    def questions(self) -> tuple[Question, ...]:
        return tuple(q for s in self.sections for q in s.questions)

    def question(self, name: str) -> Question | None:
        return next((q for q in self.questions if q.name == name), None)

    def href(self) -> str:
        return f"/register/{self.slug}"

    def defaults(self, submitter: Submitter) -> dict[str, str]:
        answers = {"channel": "desk"}
        if self.question("registration_district") is not None:
            answers["registration_district"] = submitter.office_name
        return answers

    def answers_from(self, posted: Mapping[str, str]) -> dict[str, str]:
        """The answers in a posted form, trimmed; anything else posted is ignored."""
        answers = {}
        for question in self.questions:
            for name in question.posted_names():
                value = posted.get(name)
                if isinstance(value, str) and value.strip():
                    answers[name] = value.strip()
        return answers

    def check(
        self, answers: Mapping[str, str], consents: Mapping[str, str] | None = None
    ) -> tuple[Submission | None, list[FieldError]]:
        """The submission these answers make, or every error in them, in page order."""
        data, errors = self._assemble(answers)
        data["consents"] = [{"agency": a, "choice": c} for a, c in sorted((consents or {}).items())]
        try:
            submission = self.model.model_validate(data)
        except ValidationError as exc:
            errors += [self._error_at(e["loc"], e["type"], str(e["msg"]), e.get("ctx")) for e in exc.errors()]
            submission = None
        return (None if errors else submission), self._in_page_order(errors)

    def as_recorded(self, answers: Mapping[str, str], submission: Submission) -> dict[str, str]:
        """The answers as the submission holds them (postcodes in capitals, and so on),
        so the check page shows what will be recorded."""
        recorded = submission.model_dump(mode="json")
        tidied = dict(answers)
        for question in self.questions:
            if question.kind == "text" and question.name in answers:
                value = _at(recorded, question.name.split("."))
                if isinstance(value, str):
                    tidied[question.name] = value
        return tidied

    def postcodes(self, answers: Mapping[str, str]) -> frozenset[str]:
        """Every postcode in the answers (which councils are concerned depends on them)."""
        return frozenset(
            answers[q.name] for q in self.questions if q.name.endswith(".postcode") and q.name in answers
        )

    def errors_at(self, rejected: list[dict[str, str]]) -> list[FieldError]:
        """Errors intake found after the form was checked (``SubmissionRejected.errors``)."""
        return self._in_page_order(
            [self._error_at(tuple(e["field"].split(".")), "rejected", e["message"], None) for e in rejected]
        )

    def summary(self, answers: Mapping[str, str]) -> list[SummarySection]:
        sections = []
        for section in self.sections:
            left_out = section.optional is not None and not _any_answer(section, answers)
            rows = tuple(
                SummaryRow(q.label, _shown(q, answers), f"{self.href()}#{q.anchor}", q.about)
                for q in section.questions
                if not left_out
            )
            add_href = f"{self.href()}#{section.questions[0].anchor}"
            sections.append(SummarySection(section.title, rows, left_out, add_href))
        return sections

    def _assemble(self, answers: Mapping[str, str]) -> tuple[dict[str, Any], list[FieldError]]:
        data: dict[str, Any] = {}
        errors: list[FieldError] = []
        for section in self.sections:
            if section.optional is not None and not _any_answer(section, answers):
                continue
            for question in section.questions:
                if question.kind == "date":
                    value, problem = _date(question, answers)
                else:
                    value = answers.get(question.name)
                    problem = None
                if problem is not None:
                    errors.append(_field_error(question, problem))
                elif value is None:
                    if question.required:
                        verb = "Select" if question.kind == "choice" else "Enter"
                        errors.append(_field_error(question, f"{verb} {question.about}"))
                else:
                    _put(data, question.name.split("."), value)
        return _lists(data), errors

    def _error_at(
        self, location: tuple[int | str, ...], kind: str, message: str, context: dict[str, Any] | None
    ) -> FieldError:
        path = ".".join(str(p) for p in location)
        question = self.question(path)
        if question is None and path in self.whole_part_rules:
            name, rule_message = self.whole_part_rules[path]
            question = self.question(name)
            if question is not None:
                return _field_error(question, rule_message)
        if question is None:
            question = next((q for q in self.questions if q.name.startswith(path + ".")), None)
        if question is None:
            if path.startswith("consents"):
                href = f"{self.href()}/organisations"
                return FieldError("The list of organisations has changed: choose again", None, href)
            return FieldError(f"{path}: {message}", None, f"#{self.questions[0].anchor}")
        return _field_error(question, _in_words(question, kind, message, context))

    def _in_page_order(self, errors: list[FieldError]) -> list[FieldError]:
        order = {q.name: i for i, q in enumerate(self.questions)}
        seen: set[str | None] = set()
        ordered = []
        for error in sorted(errors, key=lambda e: order.get(e.name or "", len(order))):
            key = error.name if error.name is not None else error.message
            if key not in seen:  # one message per question: the first is the one to fix
                seen.add(key)
                ordered.append(error)
        return ordered


def _field_error(question: Question, message: str) -> FieldError:
    return FieldError(message, question, f"#{question.anchor}")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _in_words(question: Question, kind: str, message: str, context: dict[str, Any] | None) -> str:
    """A pydantic error as a GOV.UK-style message that names the question."""
    about = question.about
    message = message.removeprefix("Value error, ")
    if kind in ("missing", "string_too_short"):
        return f"{'Select' if question.kind == 'choice' else 'Enter'} {about}"
    if kind == "string_too_long" and context:
        return f"{_capital(about)} must be {context['max_length']} characters or fewer"
    if kind == "literal_error":
        return f"Select {about}"
    if "control characters" in message:
        return f"{_capital(about)} must not contain control characters, such as tabs or new lines"
    if question.kind == "date":
        if "future" in message:
            return f"{_capital(about)} must be today or in the past"
        if kind.startswith("date"):
            return f"{_capital(about)} must be a real date"
    if question.example is not None and kind == "value_error" and message.startswith("must be"):
        return f"Enter {about} in the correct format, like {question.example}"
    return f"{_capital(about)} {message}"


def _date(question: Question, answers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The ISO date from a date input's three parts, or what is wrong with them."""
    parts = {p: answers.get(f"{question.name}-{p}", "") for p in DATE_PARTS}
    if not any(parts.values()):
        return None, None
    missing = [p for p in DATE_PARTS if not parts[p]]
    if missing:
        return None, f"{_capital(question.about)} must include a {' and '.join(missing)}"
    if not all(v.isdigit() and len(v) <= 4 for v in parts.values()):
        return None, f"{_capital(question.about)} must be a real date"
    if len(parts["year"]) != 4:
        return None, f"{_capital(question.about)} must include a year with 4 numbers, like 1950"
    try:
        day = date(int(parts["year"]), int(parts["month"]), int(parts["day"]))
    except ValueError:
        return None, f"{_capital(question.about)} must be a real date"
    return day.isoformat(), None


def _shown(question: Question, answers: Mapping[str, str]) -> str:
    if question.kind == "date":
        value, problem = _date(question, answers)
        if value is None or problem is not None:
            return "Not given"
        day = date.fromisoformat(value)
        return f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    value = answers.get(question.name)
    if value is None:
        return "Not given"
    if question.kind == "choice":
        return dict(question.choices).get(value, value)
    return value


def _any_answer(section: Section, answers: Mapping[str, str]) -> bool:
    return any(answers.get(name) for q in section.questions for name in q.posted_names())


def _put(data: dict[str, Any], path: list[str], value: str) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _at(node: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def _lists(node: Any) -> Any:
    """{"0": a, "1": b} → [a, b], all the way down."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


# The questions, built from a few shapes that recur.

NINO_HINT = (
    "It’s on their National Insurance card, benefit letter, payslip or P60. For example, QQ 12 34 56 C"
)


def _person(prefix: str, whose: str, *, born_required: bool, nino: bool = True) -> tuple[Question, ...]:
    questions = [
        Question(f"{prefix}.given_names", "Given names", f"{whose} given names"),
        Question(f"{prefix}.family_name", "Family name", f"{whose} family name"),
        Question(
            f"{prefix}.date_of_birth",
            "Date of birth" if born_required else "Date of birth (optional)",
            f"{whose} date of birth",
            kind="date",
            required=born_required,
            hint="For example, 27 3 1950",
        ),
    ]
    if nino:
        questions.append(
            Question(
                f"{prefix}.nino",
                "National Insurance number (optional)",
                f"{whose} National Insurance number",
                required=False,
                hint=NINO_HINT,
                width="govuk-input--width-10",
                example="QQ 12 34 56 C",
            )
        )
    return tuple(questions)


def _address(prefix: str, which: str) -> tuple[Question, ...]:
    return (
        Question(f"{prefix}.lines.0", "Address line 1", f"the first line of {which}"),
        Question(
            f"{prefix}.lines.1", "Address line 2 (optional)", f"the second line of {which}", required=False
        ),
        Question(
            f"{prefix}.town", "Town or city", f"the town or city of {which}", width="govuk-!-width-two-thirds"
        ),
        Question(
            f"{prefix}.postcode",
            "Postcode",
            f"the postcode of {which}",
            width="govuk-input--width-10",
            example="LS1 1UR",
        ),
        Question(
            f"{prefix}.uprn",
            "Unique Property Reference Number (UPRN) (optional)",
            f"the UPRN of {which}",
            required=False,
            hint="Up to 12 digits, if the address finder gave one",
            width="govuk-input--width-20",
            example="100023336956",
            numeric=True,
        ),
    )


def _informant(relationship_hint: str) -> Section:
    return Section(
        "The informant",
        (
            Question("informant.name", "Full name", "the informant’s full name"),
            Question(
                "informant.relationship",
                "Relationship",
                "the informant’s relationship",
                hint=relationship_hint,
            ),
            Question(
                "channel",
                "How are they telling you?",
                "how the informant is telling you",
                kind="choice",
                choices=(("desk", "In person"), ("phone", "By phone")),
            ),
        ),
        hint="The person giving you this information.",
    )


DEATH = RegistrationForm(
    slug="death",
    model=DeathRegistration,
    title="Register a death",
    noun="death registration",
    sections=(
        Section("The person who has died", _person("deceased", "the deceased’s", born_required=True)),
        Section(
            "The death",
            (
                Question(
                    "date_of_death",
                    "Date of death",
                    "the date of death",
                    kind="date",
                    hint="For example, 14 2 2026",
                ),
                Question(
                    "place_of_death",
                    "Place of death",
                    "the place of death",
                    hint="For example, the name of the hospital, or ‘at home’",
                ),
            ),
        ),
        Section("Their last address", _address("last_address", "the last address")),
        Section(
            "Surviving spouse or civil partner (optional)",
            (
                *_person("surviving_partner", "the partner’s", born_required=False)[:2],
                Question(
                    "surviving_partner.relationship",
                    "They were the deceased’s",
                    "whether they were a spouse or a civil partner",
                    kind="choice",
                    choices=(("spouse", "Spouse"), ("civil partner", "Civil partner")),
                ),
                *_person("surviving_partner", "the partner’s", born_required=False)[2:],
            ),
            optional="surviving_partner",
            hint="Leave this blank if there is none.",
        ),
        Section(
            "Executor (optional)",
            (
                Question("executor.given_names", "Given names", "the executor’s given names"),
                Question("executor.family_name", "Family name", "the executor’s family name"),
                Question(
                    "executor.relationship",
                    "Relationship to the deceased",
                    "the executor’s relationship to the deceased",
                    hint="For example, daughter or solicitor",
                ),
            ),
            optional="executor",
            hint="The person dealing with the estate, if known. Leave this blank if not.",
        ),
        _informant("Their relationship to the person who has died, for example, daughter"),
    ),
)

BIRTH = RegistrationForm(
    slug="birth",
    model=BirthRegistration,
    title="Register a birth",
    noun="birth registration",
    sections=(
        Section("The child", _person("child", "the child’s", born_required=True, nino=False)),
        Section(
            "The birth",
            (
                Question(
                    "place_of_birth",
                    "Place of birth",
                    "the place of birth",
                    hint="For example, the name of the hospital, or the address",
                ),
                Question("registration_district", "Registration district", "the registration district"),
            ),
        ),
        Section(
            "Parent",
            (
                *_person("parents.0", "the parent’s", born_required=False)[:2],
                Question(
                    "parents.0.relationship",
                    "Parent of the child as",
                    "whether the parent is the mother, father or parent",
                    kind="choice",
                    choices=(("mother", "Mother"), ("father", "Father"), ("parent", "Parent")),
                ),
                *_person("parents.0", "the parent’s", born_required=False)[2:],
            ),
        ),
        Section(
            "Second parent (optional)",
            (
                *_person("parents.1", "the second parent’s", born_required=False)[:2],
                Question(
                    "parents.1.relationship",
                    "Parent of the child as",
                    "whether the second parent is the mother, father or parent",
                    kind="choice",
                    choices=(("mother", "Mother"), ("father", "Father"), ("parent", "Parent")),
                ),
                *_person("parents.1", "the second parent’s", born_required=False)[2:],
            ),
            optional="parents.1",
            hint="Leave this blank if only one parent is registered.",
        ),
        Section("The child’s home address", _address("home_address", "the child’s home address")),
        _informant("Their relationship to the child, for example, mother"),
    ),
    whole_part_rules={
        "parents": ("parents.0.date_of_birth", "A parent’s date of birth must be before the child’s"),
        "child": ("child.date_of_birth", "Enter the child’s date of birth"),
    },
)

ADDRESS = RegistrationForm(
    slug="address",
    model=AddressChange,
    title="Record a change of address",
    noun="change of address",
    sections=(
        Section("The person who has moved", _person("person", "the person’s", born_required=False)),
        Section("Old address", _address("old_address", "the old address")),
        Section("New address", _address("new_address", "the new address")),
        Section(
            "The move",
            (
                Question(
                    "effective_date",
                    "Date they moved",
                    "the date they moved",
                    kind="date",
                    hint="For example, 1 3 2026",
                ),
            ),
        ),
        _informant("Their relationship to the person who has moved, for example, self or son"),
    ),
    whole_part_rules={
        "new_address": ("new_address.lines.0", "The new address must be different from the old address"),
    },
)

FORMS: dict[str, RegistrationForm] = {f.slug: f for f in (DEATH, BIRTH, ADDRESS)}
