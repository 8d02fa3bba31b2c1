"""XSAM as a torch optimizer: settings in param_groups, refused or honoured per group, never
ignored; state_dict() carries every setting and α; a plain SAM-style closure works."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from optim_closures import closure_for
from optim_reference import reference_step
from torch import Tensor, nn

from xsam.optim import GROUP_KEYS, XSAM

torch.set_num_threads(1)
F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(24, 6, generator=gen, dtype=F64), torch.randint(0, 3, (24,), generator=gen))
        for _ in range(n)
    ]


def plain_closure_for(model: nn.Module, x: Tensor, y: Tensor, calls: list[int] | None = None):
    def closure() -> Tensor:  # as SAM users write it: always backward
        if calls is not None:
            calls.append(1)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def two_groups(model: nn.Sequential, first: dict, second: dict) -> list[dict]:
    """The first layer (and BN) in one group, the last layer in the other."""
    head = list(model[3].parameters())
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    return [{"params": body, **first}, {"params": head, **second}]


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if tol:
            torch.testing.assert_close(x, y, **tol, msg=name)
        else:
            assert torch.equal(x, y), name


SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)


# -- per-group values: refused where the geometry is global, honoured where per parameter --------


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [
        ("xsam_rho", 0.1, 0.2),  # ρ: one ascent radius for the flat vector
        ("xsam_steps", 1, 2),  # k: every pass covers all parameters
        ("xsam_alpha", 0.5, 1.0),  # α: one direction u(α) for all
        ("xsam_alpha", 1.0, "dynamic"),  # … fixed in one group, searched in the other
        ("xsam_rho_max", 0.4, 0.5),  # the α search's probing radius
        ("xsam_alpha_max", 2.0, 1.5),  # the α grid
        ("xsam_alpha_delta", 0.1, 0.25),  # the α grid's spacing
        ("xsam_eps", 1e-12, 1e-10),  # added to the global norms
        ("xsam_foreach", True, False),  # one implementation for the flat vector
    ],
)
def test_a_global_setting_that_differs_between_groups_is_refused(key, first, second):
    model = make_model()
    groups = two_groups(model, {key: first}, {key: second})
    with pytest.raises(ValueError, match=rf"^{key}: .*group 0 has {first!r}, group 1 has"):
        XSAM(groups, SGD, rho=0.1, alpha=1.0)


def test_a_global_setting_given_alike_in_every_group_is_honoured():
    data = batches(3)
    model, ref = make_model(), make_model()
    groups = two_groups(model, {"xsam_rho": 0.3}, {"xsam_rho": 0.3})
    opt = XSAM(groups, SGD, rho=0.05, alpha=0.5, model=model)  # the groups' ρ wins
    ref_opt = XSAM(ref.parameters(), SGD(ref.parameters()), rho=0.3, alpha=0.5, model=ref)
    for x, y in data:
        opt.step(closure_for(model, x, y))
        ref_opt.step(closure_for(ref, x, y))
    assert_same_params(model, ref)
    assert [g["xsam_rho"] for g in opt.param_groups] == [0.3, 0.3]


@pytest.mark.parametrize("name", ["rho", "steps", "alpha", "rho_max", "eps"])
def test_an_xsam_setting_under_its_bare_name_is_refused_not_ignored(name):
    # SGD does not read these keys: without the check they would do nothing at all.
    model = make_model()
    groups = [{"params": model.parameters(), name: 0.3}]
    with pytest.raises(ValueError, match=rf"^{name}: param group 0 sets .*'xsam_{name}'"):
        XSAM(groups, SGD)
    base = torch.optim.SGD([{"params": model.parameters(), name: 0.3}], lr=0.1)
    with pytest.raises(ValueError, match=rf"^{name}: .*SGD does not read"):
        XSAM(model.parameters(), base)


@pytest.mark.parametrize(
    ("base", "own"),
    [
        (functools.partial(torch.optim.Adam, lr=1e-3, eps=1e-8), {"eps": 1e-8}),
        (functools.partial(torch.optim.RMSprop, lr=1e-3, alpha=0.9), {"alpha": 0.9}),
        (functools.partial(torch.optim.Adadelta, rho=0.8), {"rho": 0.8}),
    ],
)
def test_the_base_optimizers_own_keys_of_the_same_name_are_left_to_it(base, own):
    model = make_model()
    opt = XSAM(model.parameters(), base, rho=0.2, alpha=0.5, eps=1e-10)
    group = opt.param_groups[0]
    assert {k: group[k] for k in own} == own  # the base's setting, untouched
    assert (group["xsam_rho"], group["xsam_alpha"], group["xsam_eps"]) == (0.2, 0.5, 1e-10)
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))  # and it trains


def test_per_group_lr_momentum_and_weight_decay_are_honoured():
    # The base optimizer applies them to the update d; the reference does the same by hand.
    per_group = ({"lr": 0.2, "weight_decay": 0.0}, {"lr": 0.01, "momentum": 0.5})
    model, ref = make_model(), make_model()
    opt = XSAM(two_groups(model, *per_group), SGD, rho=0.2, alpha=0.7, model=model)
    ref_base = SGD(two_groups(ref, *per_group))
    single = make_model()  # the same run with one lr for all: the groups must make a difference
    single_opt = XSAM(single.parameters(), SGD(single.parameters()), rho=0.2, alpha=0.7)
    for x, y in batches(4):
        opt.step(closure_for(model, x, y))
        single_opt.step(closure_for(single, x, y))
        reference_step(
            ref,
            ref_base,
            closure_for(ref, x, y),
            rho=0.2,
            k=1,
            alpha=0.7,
            rho_max=0.4,
            search=False,
        )
    assert_same_params(model, ref, **TIGHT)
    assert not torch.equal(model[3].weight, single[3].weight)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.01]


def test_values_given_to_xsam_reach_a_prebuilt_base_optimizer_or_are_refused():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = XSAM([{"params": model.parameters(), "xsam_rho": 0.3, "name": "all"}], base)
    assert (base.param_groups[0]["xsam_rho"], base.param_groups[0]["name"]) == (0.3, "all")
    assert opt.param_groups is base.param_groups

    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^lr: param group 0 given to XSAM sets 0\.5.* has 0\.1"):
        XSAM([{"params": model.parameters(), "lr": 0.5}], base)


def test_a_setting_changed_in_every_group_applies_from_the_next_step():
    # Like an LR scheduler on lr: a schedule of ρ writes the groups, and XSAM reads them.
    data = batches(3)
    model, ref = make_model(), make_model()
    opt = XSAM(two_groups(model, {}, {}), SGD, rho=0.05, alpha=0.5, model=model)
    ref_opt = XSAM(ref.parameters(), SGD(ref.parameters()), rho=0.2, alpha=1.5, model=ref)
    for group in opt.param_groups:
        group["xsam_rho"], group["xsam_alpha"] = 0.2, 1.5
    for x, y in data:
        opt.step(closure_for(model, x, y))
        ref_opt.step(closure_for(ref, x, y))
    assert_same_params(model, ref)
    assert opt.alpha == 1.5


def test_a_setting_changed_in_one_group_only_is_refused_at_the_next_step():
    model = make_model()
    opt = XSAM(two_groups(model, {}, {}), SGD, rho=0.05, alpha=0.5, model=model)
    opt.param_groups[1]["xsam_rho"] = 0.2
    before = copy.deepcopy(model.state_dict())
    x, y = batches(1)[0]
    calls: list[bool] = []
    with pytest.raises(ValueError, match=r"^xsam_rho: .*group 0 has 0\.05, group 1 has 0\.2"):
        opt.step(closure_for(model, x, y, calls))
    assert calls == []  # refused before any pass
    assert_same_params(model, _loaded(make_model(), before))


def test_add_param_group_takes_the_current_settings_and_refuses_different_ones():
    model = make_model()
    extra = nn.Parameter(torch.zeros(3, dtype=F64))
    other = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = XSAM(model.parameters(), SGD(model.parameters()), rho=0.2, alpha="dynamic")
    with pytest.raises(ValueError, match=r"^xsam_rho: .*group 0 has 0\.2, group 1 has 0\.1"):
        opt.add_param_group({"params": [extra], "xsam_rho": 0.1})
    with pytest.raises(ValueError, match=r"^rho: "):
        opt.add_param_group({"params": [extra], "rho": 0.1})
    assert len(opt.param_groups) == 1  # nothing half-added
    opt.add_param_group({"params": [other], "lr": 0.01})
    added = opt.param_groups[1]
    assert added["lr"] == 0.01
    assert all(added[key] == opt.param_groups[0][key] for key in GROUP_KEYS.values())


def test_invalid_group_values_are_refused_naming_the_key():
    model = make_model()
    with pytest.raises(ValueError, match=r"^xsam_rho: must be a finite number >= 0"):
        XSAM([{"params": model.parameters(), "xsam_rho": -1.0}], SGD)
    with pytest.raises(ValueError, match=r"^xsam_alpha: must be \"dynamic\" or a number"):
        XSAM([{"params": model.parameters(), "xsam_alpha": "fast"}], SGD)


# -- state_dict: every setting and α ---------------------------------------------------------------

SETTINGS = {
    "rho": 0.2,
    "steps": 2,
    "alpha": "dynamic",
    "rho_max": 0.5,
    "alpha_max": 1.5,
    "alpha_delta": 0.25,
    "eps": 1e-10,
    "foreach": False,
}


def run(model: nn.Module, opt: XSAM, data, start: int) -> None:
    for i, (x, y) in enumerate(data, start=start):
        opt.step(closure_for(model, x, y), search_alpha=i % 3 == 0)


def test_state_dict_round_trips_every_setting_and_alpha_into_a_fresh_optimizer():
    data = batches(8)
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = XSAM(model.parameters(), base, model=model, **SETTINGS)
    run(model, opt, data[:4], start=0)
    assert opt.alpha != 1.0, "α must have moved from its start for this test to bite"
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    saved = opt.state_dict()
    for name, key in GROUP_KEYS.items():
        assert saved["param_groups"][0][key] == SETTINGS[name], key

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain data only
    resumed = make_model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    # A fresh optimizer with every default: all of it must come from the checkpoint.
    fresh = XSAM(resumed.parameters(), torch.optim.SGD(resumed.parameters(), lr=1.0), model=resumed)
    assert fresh.param_groups[0]["xsam_rho"] != SETTINGS["rho"]
    fresh.load_state_dict(checkpoint["optimizer"])
    for group, expected in zip(fresh.param_groups, opt.param_groups, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in expected.items() if k != "params"
        }
    assert (fresh.alpha, fresh.steps_taken, fresh.last_search_step) == (
        opt.alpha,
        opt.steps_taken,
        opt.last_search_step,
    )
    assert fresh.alpha_grid == opt.alpha_grid == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]

    run(model, opt, data[4:], start=4)
    run(resumed, fresh, data[4:], start=4)
    assert_same_params(model, resumed)
    assert fresh.alpha == opt.alpha


def test_a_checkpoint_without_settings_in_its_groups_keeps_the_current_ones():
    # Checkpoints written before the settings moved into param_groups.
    model = make_model()
    opt = XSAM(model.parameters(), SGD(model.parameters()), rho=0.2, alpha="dynamic")
    old = opt.state_dict()
    old["param_groups"] = [
        {k: v for k, v in g.items() if k not in GROUP_KEYS.values()} for g in old["param_groups"]
    ]
    old["xsam"]["alpha"] = 0.7
    fresh = XSAM(model.parameters(), SGD(model.parameters()), rho=0.3, steps=2, alpha="dynamic")
    fresh.load_state_dict(old)
    group = fresh.param_groups[0]
    assert (group["xsam_rho"], group["xsam_steps"], fresh.alpha) == (0.3, 2, 0.7)


def test_load_state_dict_refuses_invalid_settings_before_loading_anything():
    model = make_model()
    opt = XSAM(model.parameters(), SGD(model.parameters()), rho=0.2)
    bad = opt.state_dict()
    bad["param_groups"][0]["xsam_steps"] = 0
    bad["param_groups"][0]["lr"] = 5.0
    groups = opt.param_groups
    with pytest.raises(ValueError, match=r"^xsam_steps: must be an integer >= 1"):
        opt.load_state_dict(bad)
    assert opt.param_groups is groups and groups[0]["lr"] == 0.1


# -- a plain SAM-style closure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "search"),
    [
        (1.0, False),  # SAM, as SAM users call it
        (0.5, True),  # a fixed α ignores search_alpha: no probes, so a plain closure is enough
        ("dynamic", False),  # XSAM between searches
    ],
)
def test_a_plain_closure_works_when_no_search_runs(alpha, search):
    data = batches(3)
    a, b = make_model(), make_model()
    opt_a = XSAM(a.parameters(), SGD(a.parameters()), rho=0.2, steps=2, alpha=alpha, model=a)
    opt_b = XSAM(b.parameters(), SGD(b.parameters()), rho=0.2, steps=2, alpha=alpha, model=b)
    calls: list[int] = []
    for x, y in data:
        loss_a = opt_a.step(plain_closure_for(a, x, y, calls), search_alpha=search)
        loss_b = opt_b.step(closure_for(b, x, y))
        assert torch.equal(loss_a, loss_b)
    assert_same_params(a, b)
    assert len(calls) == 3 * len(data)  # k + 1 passes a step


def test_a_search_with_a_plain_closure_says_what_it_needs_and_changes_nothing():
    model = make_model()
    opt = XSAM(model.parameters(), SGD(model.parameters()), rho=0.2, alpha="dynamic", model=model)
    before = copy.deepcopy(model.state_dict())
    x, y = batches(1)[0]
    calls: list[int] = []
    with pytest.raises(
        ValueError, match=r"^closure: the α search .*needs closure\(backward=True\)"
    ):
        opt.step(plain_closure_for(model, x, y, calls), search_alpha=True)
    assert calls == []
    assert_same_params(model, _loaded(make_model(), before))
    assert opt.steps_taken == 0

    closure = plain_closure_for(model, x, y)  # the two-pass form refuses it the same way
    closure()
    opt.first_step()
    closure()
    with pytest.raises(ValueError, match=r"^closure: the α search"):
        opt.second_step(closure=closure, search_alpha=True)


def _loaded(model: nn.Module, state: dict) -> nn.Module:
    model.load_state_dict(state)
    return model
