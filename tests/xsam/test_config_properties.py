"""Property: any config, however extreme its numbers and strings, is valid or refused.

Generated configs mix the schema's own keys with hostile values (NaN, ±inf, 5e-324, 1e308,
integers past 2**63, lone surrogates, NUL, unknown keys). `TrainConfig` must answer each with a
`ValidationError` (`load_config`: a `ConfigurationError`), never another exception; and what it accepts
must serialise back to strict JSON and keep its derived numbers finite.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from xsam.config import (
    DATASET_NAMES,
    MODEL_NAMES,
    TrainConfig,
    alpha_probe_count,
    describe_errors,
    load_config,
)
from xsam.errors import ConfigurationError

EXTREME_FLOATS = [0.0, -0.0, 5e-324, 1e-308, 2.2e-308, 1e-9, 0.5, 1.0, 2.0, 1e9, 1e308, 1.7e308]
EXTREME_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 10**30, -(2**63)]
WORDS = ["dynamic", "epoch", "xsam", "sgd", "sgd+", "sam", "cosine", "step", "bf16", "fp32"]

floats = st.floats() | st.sampled_from(EXTREME_FLOATS)
ints = st.integers() | st.sampled_from(EXTREME_INTS)
# Any code point, surrogates included (hypothesis leaves category Cs out by default).
texts = st.text(st.characters(exclude_categories=()), max_size=8) | st.sampled_from(
    ["\ud800", "x\udfff", "\x00", "..", "/etc", "a/../../b", "~", "\\\\x", "é", ""]
)
scalars = st.none() | st.booleans() | floats | ints | texts | st.sampled_from(WORDS)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


#: A number as a config field would get it: mostly plausible, often extreme, sometimes anything.
numbers = st.sampled_from(EXTREME_FLOATS) | st.floats(0, 3) | floats | ints | st.integers(1, 3)
counts = st.integers(1, 300) | ints


def maybe_bogus(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A section with any subset of `fields`; now and then with an unknown key or value too."""
    plain = st.fixed_dictionaries({}, optional=fields)
    return plain | st.fixed_dictionaries({}, optional={**fields, "bogus": scalars})


def anything_or(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | strategy | strategy | scalars


configs = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {"name": anything_or(st.sampled_from(MODEL_NAMES))},
            optional={"options": st.dictionaries(texts, json_values, max_size=3)},
        ),
        "data": st.fixed_dictionaries(
            {"name": anything_or(st.sampled_from(DATASET_NAMES))},
            optional={
                "options": st.dictionaries(texts, json_values, max_size=3),
                "root": texts,
                "batch_size": counts,
                "num_train": counts | st.none(),
                "augment": st.booleans(),
            },
        ),
    },
    optional={
        "optimizer": maybe_bogus(
            {
                "name": anything_or(st.sampled_from(["sgd", "sgd+", "sam", "xsam"])),
                "lr": numbers,
                "momentum": st.floats(0, 0.99) | numbers,
                "weight_decay": numbers,
                "nesterov": st.booleans(),
                "rho": numbers,
                "steps": counts,
                "alpha": st.just("dynamic") | numbers,
                "rho_max": numbers | st.none(),
                "alpha_max": numbers,
                "alpha_delta": numbers,
                "search_every": st.just("epoch") | counts,
            }
        ),
        "schedule": maybe_bogus(
            {
                "epochs": counts,
                "lr_schedule": anything_or(st.sampled_from(["cosine", "step", "constant"])),
                "warmup_epochs": st.integers(0, 3) | ints,
            }
        ),
        "resources": maybe_bogus(
            {"num_workers": counts, "use_gpu": st.booleans(), "cpus_per_worker": numbers}
        ),
        "seed": ints,
        "precision": anything_or(st.sampled_from(["fp32", "bf16"])),
        "eval_every": counts,
        "log_every": counts,
    },
)

#: The issue's reproductions, always tried first.
KNOWN = [
    {"model": {"name": "mlp"}, "data": {"name": "digits"}, "optimizer": {"alpha_delta": 5e-324}},
    {
        "model": {"name": "mlp"},
        "data": {"name": "digits"},
        "optimizer": {"alpha_max": 1e308, "alpha_delta": 1e-308},
    },
]


def check_accepted(config: TrainConfig) -> None:
    # What is accepted serialises to strict JSON (no NaN, encodable text) ...
    json.dumps(config.model_dump(mode="json"), allow_nan=False).encode("utf-8")
    # ... and the numbers derived from it stay finite.
    opt = config.optimizer
    assert math.isfinite(opt.effective_rho_max)
    assert 1 <= alpha_probe_count(opt.alpha_max, opt.alpha_delta) <= 1000
    assert math.isfinite(config.resources.total_cpus)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=configs)
@example(raw=KNOWN[0])
@example(raw=KNOWN[1])
def test_train_config_is_valid_or_a_validation_error(raw):
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        assert describe_errors(exc)  # the CLI's rendering of it never fails either
        return
    check_accepted(config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=configs)
@example(raw=KNOWN[0])
@example(raw=KNOWN[1])
def test_load_config_is_valid_or_a_config_error(raw):
    text = json.dumps(raw, allow_nan=True)  # NaN as a careless file would write it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(path)
        except ConfigurationError:
            return
    check_accepted(config)
