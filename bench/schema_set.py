"""JSON-schema-constrained questions for structured output: the shared set that ``tests/test_structured.py``
and ``specdec bench-structured`` both draw from.

Each question is a chat user message for a small instruct model (SmolLM2-135M-Instruct) together with the JSON
schema its answer is constrained to. Together the schemas cover nested objects, arrays of strings, numbers,
integers and objects, enums, a const, an ``anyOf``, numbers and integers with both bounds or only a
``minimum`` (and numbers with none), booleans, optional properties, string patterns and length limits. Every
answer is kept short: every object has ``additionalProperties: false`` and at most six properties, free
strings have a ``maxLength``, arrays have a ``maxItems`` of at most four, and objects nest at most three deep.
Only keywords llguidance supports are used (no ``format``, no ``$ref``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
ZIP_PATTERN = r"^\d{5}$"
CODE_PATTERN = r"^[A-Z]{3}-\d{3}$"
EMAIL_PATTERN = r"^[a-z]{1,12}@[a-z]{1,10}\.(com|org|net)$"


@dataclass(frozen=True)
class SchemaQuestion:
    """One structured-output item: ``prompt`` is the user message, ``schema`` constrains the answer."""

    name: str
    prompt: str
    schema: dict[str, Any]


def _object(properties: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object schema; every property is required except those named in ``optional``."""
    unknown = set(optional) - set(properties)
    if unknown:
        raise ValueError(f"optional names unknown properties: {sorted(unknown)}")
    return {
        "type": "object",
        "properties": properties,
        "required": [key for key in properties if key not in optional],
        "additionalProperties": False,
    }


def _text(max_length: int) -> dict[str, Any]:
    """A non-empty free string of at most ``max_length`` characters."""
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def _pattern(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _integer(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    return _bounded("integer", minimum, maximum)


def _number(minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    return _bounded("number", minimum, maximum)


def _bounded(kind: str, minimum: float | None, maximum: float | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _boolean() -> dict[str, Any]:
    return {"type": "boolean"}


def _array(items: dict[str, Any], min_items: int, max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


SCHEMA_QUESTIONS: list[SchemaQuestion] = [
    SchemaQuestion(
        name="person",
        prompt="Give the name, age and city of a fictional person as JSON.",
        schema=_object({"name": _text(30), "age": _integer(0, 120), "city": _text(30)}),
    ),
    SchemaQuestion(
        name="product-review",
        prompt="Write a short review of a pair of headphones as JSON, with a rating from 1 to 5.",
        schema=_object(
            {
                "product": _text(40),
                "rating": _integer(1, 5),
                "recommend": _boolean(),
                "pros": _array(_text(30), 1, 3),
            },
            optional=("pros",),
        ),
    ),
    SchemaQuestion(
        name="recipe",
        prompt="Describe a simple pancake recipe as JSON, listing up to four ingredients with their weights in grams.",
        schema=_object(
            {
                "title": _text(40),
                "servings": _integer(1, 12),
                "vegetarian": _boolean(),
                "ingredients": _array(_object({"item": _text(30), "grams": _number(0, 2000)}), 1, 4),
            }
        ),
    ),
    SchemaQuestion(
        name="weather-report",
        prompt="Give today's weather in Paris as JSON: the date, the temperature in Celsius and the sky condition.",
        schema=_object(
            {
                "city": _text(30),
                "date": _pattern(DATE_PATTERN),
                "temperature_c": _number(-50, 60),
                "condition": _enum("sunny", "cloudy", "rainy", "snowy", "windy"),
                "humidity": _integer(0, 100),
            },
            optional=("humidity",),
        ),
    ),
    SchemaQuestion(
        name="book",
        prompt="Describe a classic novel as JSON: its title, its author's first and last name, and its year.",
        schema=_object(
            {
                "title": _text(40),
                "author": _object({"first_name": _text(20), "last_name": _text(20)}),
                "year": _integer(1450, 2025),
                "genres": _array(_text(20), 1, 3),
            },
            optional=("genres",),
        ),
    ),
    SchemaQuestion(
        name="event",
        prompt="Describe an upcoming music concert as JSON, with its date, venue and expected number of attendees.",
        schema=_object(
            {
                "name": _text(40),
                "date": _pattern(DATE_PATTERN),
                "location": _object({"venue": _text(40), "city": _text(30)}),
                "attendees": _integer(0),
                "free": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="address",
        prompt="Give a made-up street address in the United States as JSON, with a five-digit zip code.",
        schema=_object(
            {
                "street": _text(40),
                "city": _text(30),
                "state": _pattern(r"^[A-Z]{2}$"),
                "zip": _pattern(ZIP_PATTERN),
                "country": {"type": "string", "const": "USA"},
            }
        ),
    ),
    SchemaQuestion(
        name="order",
        prompt="Give an online shop order as JSON: an order id like ABC-123, the items bought, the total and status.",
        schema=_object(
            {
                "order_id": _pattern(CODE_PATTERN),
                "items": _array(_object({"name": _text(30), "quantity": _integer(1, 10), "price": _number(0)}), 1, 3),
                "total": _number(0),
                "status": _enum("pending", "shipped", "delivered", "cancelled"),
            }
        ),
    ),
    SchemaQuestion(
        name="contact-card",
        prompt="Give a contact card for a fictional colleague as JSON, with a name and an email address.",
        schema=_object(
            {
                "name": _text(30),
                "email": _pattern(EMAIL_PATTERN),
                "phone": _pattern(r"^\d{3}-\d{3}-\d{4}$"),
            },
            optional=("phone",),
        ),
    ),
    SchemaQuestion(
        name="movie",
        prompt="Describe a famous science-fiction movie as JSON: title, year, rating out of 10 and length in minutes.",
        schema=_object(
            {
                "title": _text(40),
                "year": _integer(1900, 2025),
                "rating": _number(0, 10),
                "duration_minutes": _integer(1),
                "watched": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="flight",
        prompt="Give the details of a flight from London to New York as JSON, using three-letter airport codes.",
        schema=_object(
            {
                "flight_number": _pattern(r"^[A-Z]{2}\d{3,4}$"),
                "origin": _pattern(r"^[A-Z]{3}$"),
                "destination": _pattern(r"^[A-Z]{3}$"),
                "departure": _pattern(DATE_PATTERN),
                "seats_left": _integer(0),
                "cabin": _enum("economy", "business", "first"),
            }
        ),
    ),
    SchemaQuestion(
        name="temperature-readings",
        prompt="Give three or four hourly temperature readings for Oslo as JSON.",
        schema=_object(
            {
                "city": _text(30),
                "unit": _enum("celsius", "fahrenheit"),
                "readings": _array(_number(-50, 60), 3, 4),
            }
        ),
    ),
    SchemaQuestion(
        name="shopping-list",
        prompt="Write a short grocery shopping list as JSON, with the store name and up to four items.",
        schema=_object(
            {
                "store": _text(30),
                "items": _array(_text(20), 1, 4),
                "budget": _number(0, 500),
            },
            optional=("budget",),
        ),
    ),
    SchemaQuestion(
        name="employee",
        prompt="Describe an employee of a software company as JSON, with their department, salary and manager.",
        schema=_object(
            {
                "name": _text(30),
                "department": _enum("engineering", "sales", "marketing", "support"),
                "salary": _integer(0),
                "remote": _boolean(),
                "manager": _object({"name": _text(30), "email": _pattern(EMAIL_PATTERN)}),
            },
            optional=("manager",),
        ),
    ),
    SchemaQuestion(
        name="pet",
        prompt="Describe a family pet as JSON: its name, species, age and whether it is vaccinated.",
        schema=_object(
            {
                "name": _text(20),
                "species": _enum("dog", "cat", "bird", "fish", "rabbit"),
                "age": _integer(0, 30),
                "vaccinated": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="car",
        prompt="Describe a used car for sale as JSON: make, model, year, price and whether it is electric.",
        schema=_object(
            {
                "make": _text(20),
                "model": _text(20),
                "year": _integer(1950, 2025),
                "price": _number(),
                "electric": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="restaurant",
        prompt="Describe a neighbourhood restaurant as JSON, with its cuisine, rating from 1 to 5 and address.",
        schema=_object(
            {
                "name": _text(30),
                "cuisine": _text(20),
                "rating": _number(1, 5),
                "open_now": _boolean(),
                "address": _object({"street": _text(40), "city": _text(30), "zip": _pattern(ZIP_PATTERN)}),
            }
        ),
    ),
    SchemaQuestion(
        name="student-grades",
        prompt="Give a student's name and their test scores out of 100 as JSON.",
        schema=_object(
            {
                "student": _text(30),
                "scores": _array(_integer(0, 100), 1, 4),
                "passed": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="hotel-booking",
        prompt="Give a hotel booking as JSON: the guest's name and email, the check-in date, nights and room type.",
        schema=_object(
            {
                "guest": _object({"name": _text(30), "email": _pattern(EMAIL_PATTERN)}),
                "check_in": _pattern(DATE_PATTERN),
                "nights": _integer(1, 14),
                "room": _enum("single", "double", "suite"),
                "breakfast": _boolean(),
            },
            optional=("breakfast",),
        ),
    ),
    SchemaQuestion(
        name="country-facts",
        prompt="Give a few facts about Japan as JSON: capital, population, continent and main languages.",
        schema=_object(
            {
                "country": _text(30),
                "capital": _text(30),
                "population": _integer(0),
                "continent": _enum("africa", "asia", "europe", "north-america", "south-america", "oceania"),
                "languages": _array(_text(20), 1, 3),
            }
        ),
    ),
    SchemaQuestion(
        name="team",
        prompt="Describe a small software team as JSON: the team name and up to four members with their roles.",
        schema=_object(
            {
                "team_name": _text(30),
                "members": _array(
                    _object({"name": _text(20), "role": _enum("lead", "developer", "designer", "tester")}), 1, 4
                ),
            }
        ),
    ),
    SchemaQuestion(
        name="sensor-reading",
        prompt="Give a reading from an outdoor air sensor with an id like SEN-042 as JSON, including its location.",
        schema=_object(
            {
                "sensor_id": _pattern(CODE_PATTERN),
                "value": {"anyOf": [_number(), _enum("offline", "error")]},
                "location": _object({"lat": _integer(-90, 90), "lon": _integer(-180, 180)}),  # a free number may run on
                "battery_ok": _boolean(),
            }
        ),
    ),
    SchemaQuestion(
        name="company",
        prompt="Describe a technology company as JSON: its name, founding year, headquarters and employee count.",
        schema=_object(
            {
                "name": _text(30),
                "founded": _integer(1800, 2025),
                "employees": _integer(1),
                "public": _boolean(),
                "headquarters": _object(
                    {
                        "city": _text(30),
                        "country": _text(30),
                        "coordinates": _object({"lat": _number(-90, 90), "lon": _number(-180, 180)}),
                    },
                    optional=("coordinates",),
                ),
            }
        ),
    ),
    SchemaQuestion(
        name="trivia-question",
        prompt="Write a multiple-choice trivia question about geography as JSON, with four options and the answer.",
        schema=_object(
            {
                "question": _text(80),
                "options": _array(_text(30), 4, 4),
                "answer": _text(30),
                "difficulty": _enum("easy", "medium", "hard"),
            }
        ),
    ),
]


def _check_objects(schema: Any, where: str) -> None:
    """Every object schema inside ``schema`` must be closed and have at most six properties."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            if schema.get("additionalProperties") is not False:
                raise ValueError(f"{where}: an object without additionalProperties: false")
            if len(schema.get("properties", {})) > 6:
                raise ValueError(f"{where}: an object with more than six properties")
        for value in schema.values():
            _check_objects(value, where)
    elif isinstance(schema, list):
        for value in schema:
            _check_objects(value, where)


def check_schemas() -> None:
    """Check every schema against its metaschema, the set's invariants, and that names are unique."""
    from jsonschema.validators import validator_for

    names = [question.name for question in SCHEMA_QUESTIONS]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate schema question names: {duplicates}")
    for question in SCHEMA_QUESTIONS:
        validator_for(question.schema).check_schema(question.schema)
        if question.schema.get("type") != "object":
            raise ValueError(f"{question.name}: the top level is not an object")
        _check_objects(question.schema, question.name)
