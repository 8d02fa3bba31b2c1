"""XSAM: eXplicit Sharpness-Aware Minimization, as a wrapper around any base optimizer.

The algorithm is the one restated in ../shared/XSAM.md (Chen & Zhou, arXiv 2603.10048,
ICLR 2026); `XSAM`'s docstring carries it as pseudo-code together with every place where this
implementation deliberately differs from the authors' reference code.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer

from xsam.config import MAX_ALPHA_PROBES, alpha_probe_count
from xsam.nonfinite import zero_unless_finite_

__all__ = ["XSAM"]

#: ``closure(backward=True) -> loss``: zero the grads, forward on the step's minibatch and, when
#: ``backward`` is true, backward; return the loss. A plain SAM-style ``closure() -> loss`` that
#: always calls ``loss.backward()`` works too, except for an α search (forward-only probes).
Closure = Callable[..., Any]

#: XSAM's settings as keys of every param group (constructor argument -> key). The groups are the
#: base optimizer's own dicts, where torch's optimizers already use ``rho`` (Adadelta), ``alpha``
#: (RMSprop, ASGD), ``eps`` (Adam and most others) and ``foreach`` for their own settings: hence
#: the prefix. All of them are global (one flat parameter vector), so every group holds the same.
GROUP_KEYS = {
    name: f"xsam_{name}"
    for name in ("rho", "steps", "alpha", "rho_max", "alpha_max", "alpha_delta", "eps", "foreach")
}
_MISSING = object()


@dataclass(frozen=True)
class _Settings:
    """XSAM's settings for one step, read from the param groups and checked."""

    rho: float
    steps: int
    alpha: float | Literal["dynamic"]
    rho_max: float
    alpha_max: float
    alpha_delta: float
    eps: float
    foreach: bool
    probes: int


class XSAM(Optimizer):
    r"""Implements XSAM (eXplicit Sharpness-Aware Minimization) around a base optimizer.

    SAM takes a normalised ascent step of radius ρ and applies the gradient found there at the
    current weights. XSAM searches the 2-D plane spanned by the ascent displacement v₀ and the
    ascent-point gradient v₁ for the direction of highest loss, u(α), and steps away from it.
    α = 1 is (k-step) SAM, α = 0 is "SGD+" (the local direction with SAM's magnitude).

    .. code-block:: text

        input: θ₀ (params), closure over one minibatch B, ρ (rho), k (steps), α (alpha),
               ρ_max (rho_max), α_max, Δα (alpha_delta), ε (eps), base optimizer
        L_clean ← closure()                          g₀ = ∇L(θ₀; B); BN statistics move here only
        for i = 0, …, k−1:
            θᵢ₊₁ ← θᵢ + (ρ/k)·gᵢ / (‖gᵢ‖ + ε)         (a zero gradient does not move θ)
            L_pert ← closure()                       gᵢ₊₁ = ∇L(θᵢ₊₁; B)
        s ← ‖g_k‖
        v₀ ← (θ_k − θ₀) / (‖θ_k − θ₀‖ + ε);    v₁ ← g_k / (s + ε)
        φ ← 2·atan2(‖v₀ − v₁‖, ‖v₀ + v₁‖)
        u(a) ← [sin((1 − a)φ)·v₀ + sin(aφ)·v₁] / sin φ
               (u(a) ← v₁ when sin φ ≤ √eps(dtype), i.e. φ ≈ 0 or φ ≈ π, or when θ_k = θ₀)
        if search_alpha and alpha == "dynamic" and u is not degenerate:
            for a in 0, Δα, …, α_max:
                ℓ(a) ← L(θ₀ + ρ_max·u(a); B)          forward only, no grad, train mode
            ℓ ← mean of ℓ over ranks                 (when torch.distributed is initialised)
            α ← the smallest a with the largest ℓ(a)
        θ ← θ₀;   grad ← s·u(α)
        if s or ‖θ_k − θ₀‖ is not finite: grad ← 0  on the device, no host sync
        base_optimizer.step()                        weight decay and momentum act on s·u(α)
        restore BN running statistics (of ``model``) to their value after the first forward
        return L_clean

    Norms, dot products and φ are global over all parameters with a gradient (one flat
    vector), never per layer, and are computed in float32 or the parameter dtype if wider,
    whatever autocast is doing. Parameters narrower than float32 (bfloat16, float16) are
    refused: the ascent step ρ·g/‖g‖ is mostly rounding error in them; keep float32 weights
    and train under autocast instead.

    Args:
        params (iterable): the parameters (or parameter groups) to optimise; must be exactly
            the ones ``base_optimizer`` optimises.
        base_optimizer (Optimizer or callable): an optimizer over the same parameters, or a
            callable that builds one from ``params`` (e.g. ``functools.partial(torch.optim.SGD,
            lr=0.05, momentum=0.9)``). XSAM shares its ``param_groups`` and ``state`` (the same
            objects), so an LR scheduler works attached to either.
        rho (float, optional): total ascent radius ρ; each of the ``steps`` ascent steps moves
            ρ/k (default: 0.05; the paper uses 0.15 on CIFAR).
        steps (int, optional): number of ascent steps k (default: 1).
        alpha (float or "dynamic", optional): a fixed α in [0, alpha_max] (1.0 = SAM, 0.0 =
            SGD+), or ``"dynamic"``: XSAM proper, α = 1.0 until the first search, then the
            result of the latest search (default: 1.0).
        rho_max (float, optional): probing radius of the α search, ≥ rho (default: 2·rho).
        alpha_max (float, optional): the last point of the α grid (default: 2.0).
        alpha_delta (float, optional): spacing of the α grid 0, Δα, …, α_max (default: 0.1,
            i.e. 21 probes).
        eps (float, optional): added to norms, > 0 (default: 1e-12).
        model (nn.Module, optional): when given, the running statistics of its BatchNorm (and
            tracking InstanceNorm) layers, ``num_batches_tracked`` included, are restored after
            every step to their value after the step's first forward, so the ascent passes and
            the α probes leave them untouched (default: None, no restoring).
        foreach (bool, optional): use the ``torch._foreach_*`` implementation (default: None,
            which means True); False runs the plain per-tensor loop.

    Every argument but ``model`` is only a default: the settings live in each param group as
    ``xsam_rho``, ``xsam_steps``, ``xsam_alpha``, ``xsam_rho_max``, ``xsam_alpha_max``,
    ``xsam_alpha_delta``, ``xsam_eps`` and ``xsam_foreach`` (``GROUP_KEYS``; prefixed because
    the groups are the base optimizer's dicts, where e.g. Adam keeps its own ``eps``), are read
    at every step and travel in ``state_dict()``. They are global, so a group whose value
    differs from the others' is refused with ``ValueError`` (as is a bare ``rho`` etc. that the
    base optimizer does not read); ``lr``, ``momentum``, ``weight_decay`` are the base
    optimizer's and act per group.

    Attributes:
        alpha (float): the α in use (read-only: the fixed ``xsam_alpha``, or the latest search's).
        alpha_grid (list[float]): the probed α values.
        steps_taken (int): completed XSAM steps.
        last_search_step (int or None): the step (counted like ``steps_taken``, from 1) that
            last asked for an α search.
        last_stats (dict): telemetry of the latest step: ``phi`` (radians), ``grad_norm``
            (‖g₀‖), ``ascent_grad_norm`` (s = ‖g_k‖), ``finite`` (bool: the update was
            finite and applied; when false a zero gradient went to the base optimizer, so
            no NaN/inf reached the weights or momentum), ``clean_loss`` (at θ₀) and
            ``perturbed_loss`` (at θ_k; both None after ``second_step``) as 0-dim tensors, which
            XSAM never reads back to the host (call ``float()`` when logging); ``alpha`` as a
            float; ``probe_alphas`` and ``probe_losses`` (lists of floats) when a search ran.

    ``step(closure, search_alpha=False)`` calls ``closure(backward=True)`` k + 1 times (grad
    enabled) and, when it searches, ``closure(backward=False)`` once per probe under
    ``torch.no_grad()``, and returns the loss at θ₀. A plain SAM-style ``closure()`` (no
    ``backward`` argument) is called as it is when no search runs; a search refuses it. For SAM-style two-pass loops there are
    ``first_step()`` (one ascent step from the current ``.grad``; call it k times, with a
    forward+backward after each) and ``second_step()``.

    Example:
        >>> model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        >>> optimizer = XSAM(model.parameters(), base, rho=0.15, alpha="dynamic", model=model)
        >>> x, y = torch.randn(125, 40), torch.randint(0, 10, (125,))
        >>> def closure(backward=True):
        ...     optimizer.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     if backward:
        ...         loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure, search_alpha=True)  # e.g. first batch of an epoch

    Reference: J. Chen and Z. Zhou, "Revisiting Sharpness-Aware Minimization: A More Faithful
    and Effective Implementation", ICLR 2026, arXiv:2603.10048.

    Deviations from the authors' reference code (../shared/XSAM.md, "DIFF"):
        - Numerics: φ = 2·atan2(‖v₀−v₁‖, ‖v₀+v₁‖) instead of an unclamped arccos, which turns
          NaN when the rounded dot product exceeds 1. When sin φ ≤ √eps (φ ≈ 0 or φ ≈ π,
          where the reference's update becomes zero) or the displacement is zero, u falls back
          to the SAM direction v₁; a search at such a step has nothing to choose between (all
          probes coincide) and keeps α. Geometry in float32 or wider.
        - DDP: the probe losses are averaged over ranks before the argmax, so every rank
          applies the same update; with DDP-averaged gradients, N ranks then equal one
          process on the global batch (BatchNorm aside).
        - Checkpoints: ``state_dict()`` holds the base optimizer's state (momentum) and
          param groups (with XSAM's settings) plus α, ``steps_taken`` and
          ``last_search_step``, and no parameter-sized scratch buffers.
        - Search schedule: the caller decides when to search (``search_alpha``), e.g. on the
          first minibatch of each epoch or every N steps; ``last_search_step`` survives a
          resume so that a mid-epoch resume neither skips nor repeats a search.
        - Probes returning NaN are ignored by the argmax (α is kept if all are NaN).
        - A non-finite update (NaN/inf in any gᵢ) is replaced by zero on the device before
          the base optimizer sees it, so the weights and momentum stay finite; the reference
          writes the NaN into both. ``last_stats["finite"]`` tells the caller, who decides
          when to read it back (xsam.training fails the run ``diverged`` at its next read).

    Memory: two parameter-sized buffers beyond the base optimizer (θ₀ and the displacement);
    the gradients' own storage is reused for v₁ and the update, and the parameters' for the
    probe points, also during a search.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Optimizer | Callable[..., Optimizer],
        *,
        rho: float = 0.05,
        steps: int = 1,
        alpha: float | str = 1.0,
        rho_max: float | None = None,
        alpha_max: float = 2.0,
        alpha_delta: float = 0.1,
        eps: float = 1e-12,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        arguments = dict(
            rho=rho,
            steps=steps,
            alpha=alpha,
            rho_max=rho_max,
            alpha_max=alpha_max,
            alpha_delta=alpha_delta,
            eps=eps,
            foreach=foreach,
        )
        _validated(arguments, lambda name: name)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model: must be an nn.Module or None (got {type(model).__name__})")

        # Lists, not generators: the groups' params are read more than once below.
        items: list[Any] = [
            {**item, "params": _as_list(item["params"])} if isinstance(item, dict) else item
            for item in params
        ]
        # Which keys each given group sets itself (the rest are filled from the defaults).
        groups_given = bool(items) and isinstance(items[0], dict)
        explicit = [set(item) - {"params"} for item in items] if groups_given else [set()]
        _refuse_narrow_dtypes(
            p for item in items for p in (item["params"] if isinstance(item, dict) else [item])
        )
        if isinstance(base_optimizer, Optimizer):
            base = base_optimizer
        elif callable(base_optimizer):
            base = base_optimizer(items)
            if not isinstance(base, Optimizer):
                raise ValueError(
                    f"base_optimizer: the callable must return a torch.optim.Optimizer "
                    f"(got {type(base).__name__})"
                )
        else:
            raise ValueError(
                f"base_optimizer: must be a torch.optim.Optimizer or a callable building one "
                f"(got {type(base_optimizer).__name__})"
            )

        # Stored as given, only made floats; rho_max None means 2·rho and foreach None True.
        arguments.update(
            rho=float(rho),
            alpha=alpha if alpha == "dynamic" else float(alpha),
            rho_max=None if rho_max is None else float(rho_max),
            alpha_max=float(alpha_max),
            alpha_delta=float(alpha_delta),
            eps=float(eps),
        )
        defaults = {GROUP_KEYS[name]: value for name, value in arguments.items()}
        super().__init__(items, defaults)  # normalises `params`; the groups are replaced below
        given = self.param_groups
        own = {id(p) for group in given for p in group["params"]}
        shared = {id(p) for group in base.param_groups for p in group["params"]}
        if own != shared:
            raise ValueError(
                "base_optimizer: must optimise exactly the parameters given to XSAM "
                f"({len(own)} given, {len(shared)} in the base optimizer, "
                f"{len(own & shared)} in common)"
            )
        self.base_optimizer = base
        self._share_base_state()
        _refuse_bare_names(given, base)
        _refuse_bare_names(self.param_groups, base)
        _carry_given_values(given, explicit, self.param_groups)
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)

        self.steps_taken = 0
        self.last_search_step: int | None = None
        self.last_stats: dict[str, Any] = {}
        self._searched_alpha = 1.0  # α of a "dynamic" setting until the first search
        self._settings()  # every group's values are valid and the same

        self._norm_layers = (
            [m for m in model.modules() if isinstance(m, _NormBase)] if model is not None else []
        )
        # Scratch, reused across steps and never checkpointed.
        self._key: tuple[Any, ...] | None = None
        self._theta0: list[Tensor] = []  # θ₀
        self._disp: list[Tensor] = []  # θ_k − θ₀, later a·(v₀ + v₁) and the update's v₀ part
        self._dtype = torch.float32  # the geometry's dtype
        self._active: list[Tensor] = []  # the parameters of the step in progress
        self._norm_live: list[Tensor] = []
        self._norm_saved: list[Tensor] = []
        self._ascents = 0  # ascent steps taken in the step in progress
        self._grad_norm: Tensor | None = None

    @property
    def alpha(self) -> float:
        """The α in use: the fixed one, or for ``"dynamic"`` the latest search's (1.0 before)."""
        return self._alpha_in_use(self._settings())

    @property
    def alpha_grid(self) -> list[float]:
        """The probed α values 0, Δα, …, α_max."""
        return _grid(self._settings())

    # -- the public steps ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None, search_alpha: bool = False) -> Any:
        """One XSAM step on the closure's minibatch; returns the loss at θ₀.

        ``closure(backward=True)`` zeroes the grads, runs the forward and, when ``backward``,
        the backward, and returns the loss. A plain ``closure()`` that always runs the
        backward (as for SAM) works too, unless an α search runs. With ``search_alpha``
        (dynamic α only) the α grid is probed first; otherwise the flag is ignored.
        """
        if closure is None:
            raise ValueError(
                "closure: XSAM.step needs closure(backward=True) -> loss; without one, use "
                "first_step() and second_step()"
            )
        settings = self._settings()
        search = search_alpha and settings.alpha == "dynamic"
        if search:
            _require_probe_closure(closure)
        passes = _training_pass(closure)
        try:
            with torch.enable_grad():
                clean = passes()
            perturbed = clean
            for _ in range(settings.steps):
                self.first_step()
                with torch.enable_grad():
                    perturbed = passes()
            self.second_step(closure=closure, search_alpha=search_alpha)
        except BaseException:
            self._abandon_step()
            raise
        self.last_stats["clean_loss"] = _detached(clean)
        self.last_stats["perturbed_loss"] = _detached(perturbed)
        return clean

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """One ascent step from the current ``.grad`` (the first one saves θ₀).

        Call it ``steps`` times, each followed by a forward+backward on the same minibatch,
        then ``second_step()``.
        """
        settings = self._settings()
        k, rho, eps = settings.steps, settings.rho, settings.eps
        if self._ascents >= k:
            raise RuntimeError(
                f"first_step: already called {k} time(s) (steps={k}); call second_step() next"
            )
        params, grads = self._params_with_grad()
        if self._ascents == 0:
            self._prepare(params)
            self._snapshot_norm_stats()
        elif len(params) != len(self._active):
            raise RuntimeError("first_step: the parameters with a gradient changed mid-step")
        norm = _global_norm(grads, self._dtype, settings.foreach)
        if self._ascents == 0:
            self._grad_norm = norm
        scale = (rho / k) / (norm + eps)
        ascend = _multi_tensor_ascend if settings.foreach else _single_tensor_ascend
        ascend(params, grads, self._theta0, self._disp, scale, self._ascents == 0)
        self._ascents += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        *,
        closure: Closure | None = None,
        search_alpha: bool = False,
    ) -> None:
        """Form the update s·u(α) from the ascent-point ``.grad``, restore θ₀, step the base.

        With ``search_alpha`` (dynamic α only) α is searched first, which needs ``closure``
        for the forward-only probes.
        """
        settings = self._settings()
        k, eps = settings.steps, settings.eps
        search = search_alpha and settings.alpha == "dynamic"
        if search:
            if closure is None:
                raise ValueError("closure: second_step(search_alpha=True) needs a closure to probe")
            _require_probe_closure(closure)
        if self._ascents != k:
            raise RuntimeError(
                f"second_step: call first_step() {k} time(s) first (called {self._ascents})"
            )
        params, grads = self._params_with_grad()
        if len(params) != len(self._active):
            raise RuntimeError("second_step: the parameters with a gradient changed mid-step")
        theta0, disp, fe = self._theta0, self._disp, settings.foreach

        # The plane. Everything is scaled by a = ‖θ_k − θ₀‖ + ε, so that θ_k − θ₀ = a·v₀ needs
        # no pass of its own: grads ← a·v₁, params ← a(v₀ − v₁), disp ← a(v₀ + v₁).
        disp_norm, s = _global_norm_pair(disp, grads, self._dtype, fe)
        a = disp_norm + eps
        (_multi_tensor_plane if fe else _single_tensor_plane)(params, grads, disp, a / (s + eps))
        diff_norm, sum_norm = _global_norm_pair(params, disp, self._dtype, fe)
        phi = 2 * torch.atan2(diff_norm, sum_norm)  # atan2's common scale a cancels
        tol = math.sqrt(torch.finfo(self._dtype).eps)
        degenerate = (torch.sin(phi) <= tol) | (disp_norm <= eps)

        probe_losses = None
        if search and closure is not None:  # (closure is never None here; see above)
            probe_losses = self._search(
                settings, closure, params, grads, disp, theta0, phi, degenerate, a
            )
            self.last_search_step = self.steps_taken + 1

        # d = s·u(α) = (s/a)·[(c₁ − c₀)·a·v₁ + c₀·a(v₀ + v₁)], written into .grad
        alpha = self._alpha_in_use(settings)
        c0, c1 = _slerp_coefficients(phi, alpha, degenerate)
        s_over_a = s / a
        (_multi_tensor_direction if fe else _single_tensor_direction)(
            grads, disp, s_over_a * (c1 - c0), s_over_a * c0
        )
        (torch._foreach_copy_ if fe else _copy_each)(params, theta0)
        # Any NaN/inf in g₀…g_k reaches s or ‖θ_k − θ₀‖; decided on the device, not the host.
        finite = torch.isfinite(s) & torch.isfinite(disp_norm)
        zero_unless_finite_(grads, finite)
        self._restore_norm_stats()
        self._ascents = 0
        self._active = []
        self.base_optimizer.step()
        self.steps_taken += 1

        self.last_stats = {
            "phi": phi,
            "alpha": alpha,
            "grad_norm": self._grad_norm,
            "ascent_grad_norm": s,
            "finite": finite,
            "clean_loss": None,
            "perturbed_loss": None,
        }
        if probe_losses is not None:
            self.last_stats["probe_alphas"] = _grid(settings)
            self.last_stats["probe_losses"] = probe_losses
        if zero_grad:
            self.zero_grad()

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``"xsam"`` entry with α and the counters.

        XSAM's settings are in its ``param_groups`` (``xsam_rho``, …), like the base's ``lr``.
        """
        state = self.base_optimizer.state_dict()
        state["xsam"] = {
            "alpha": self.alpha,
            "steps_taken": self.steps_taken,
            "last_search_step": self.last_search_step,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict` wrote: the settings in its groups, α and the counters.

        Groups saved without XSAM's settings (checkpoints older than them) keep the current
        ones. Invalid or differing settings are refused before anything is loaded.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("xsam", None)
        if not isinstance(saved, dict):
            raise ValueError("state_dict: not an XSAM state dict (no 'xsam' entry)")
        current = {key: self.param_groups[0][key] for key in GROUP_KEYS.values()}
        groups = [current | dict(group) for group in state_dict.get("param_groups", [])]
        _common_settings(groups)
        state_dict["param_groups"] = groups
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_state()  # the base rebinds its groups and state on load
        self._searched_alpha = float(saved["alpha"])
        self.steps_taken = int(saved["steps_taken"])
        last = saved["last_search_step"]
        self.last_search_step = None if last is None else int(last)
        self._ascents = 0
        self._active = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (and so to XSAM); XSAM's settings as the others'."""
        base = self.__dict__.get("base_optimizer")
        if base is None:  # Optimizer.__init__ building XSAM's own (soon replaced) groups
            super().add_param_group(param_group)
            return
        _refuse_bare_names([param_group], base)
        current = {key: self.param_groups[0][key] for key in GROUP_KEYS.values()}
        _common_settings([current, current | param_group])  # before the base holds it
        base.add_param_group(current | param_group)  # the groups are shared: XSAM sees it too

    def _share_base_state(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _settings(self) -> _Settings:
        """XSAM's settings from the param groups; refused when invalid or not the same in all."""
        return _common_settings(self.param_groups)

    def _alpha_in_use(self, settings: _Settings) -> float:
        return self._searched_alpha if settings.alpha == "dynamic" else settings.alpha

    # -- internals ---------------------------------------------------------------------------

    def _params_with_grad(self) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
        if not params:
            raise RuntimeError("XSAM: no parameter has a gradient; run backward first")
        return params, grads

    def _prepare(self, params: list[Tensor]) -> None:
        # A model moved to another device or dtype keeps its Parameter objects: check both.
        key = (*map(id, params), params[0].device, params[0].dtype)
        if key != self._key:
            _refuse_narrow_dtypes(params)
            self._theta0 = [torch.empty_like(p) for p in params]
            self._disp = [torch.empty_like(p) for p in params]
            self._dtype = functools.reduce(
                torch.promote_types, {p.dtype for p in params}, torch.float32
            )
            self._key = key
        self._active = params

    def _search(
        self,
        settings: _Settings,
        closure: Closure,
        params: list[Tensor],
        grads: list[Tensor],
        disp: list[Tensor],
        theta0: list[Tensor],
        phi: Tensor,
        degenerate: Tensor,
        a: Tensor,
    ) -> list[float] | None:
        if degenerate.item():  # every u(α) is v₁: nothing to choose between, keep α
            return None
        alphas = _grid(settings)
        grid = torch.tensor(alphas, dtype=phi.dtype, device=phi.device)
        c0, c1 = _slerp_coefficients(phi, grid, degenerate)
        scale = settings.rho_max / a
        # One host sync for all probe coefficients: θ₀ + ρ_max·u = θ₀ + x·(a v₁) + y·a(v₀ + v₁).
        xs, ys = ((c1 - c0) * scale).tolist(), (c0 * scale).tolist()
        place = _multi_tensor_place if settings.foreach else _single_tensor_place
        # .grad holds a·v₁: detach it so that a probe's zero_grad() cannot clear it.
        for p in params:
            p.grad = None
        losses = []
        try:
            for x, y in zip(xs, ys, strict=True):
                place(params, theta0, grads, disp, x, y)
                losses.append(torch.as_tensor(closure(backward=False)).detach().reshape(()))
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        curve = torch.stack(losses).to(torch.float64)
        if dist.is_available() and dist.is_initialized():
            # Probe losses are rank-local (unlike the DDP-averaged gradients): average them so
            # that every rank picks the same α and the replicas stay identical.
            dist.all_reduce(curve)
            curve /= dist.get_world_size()
        values = curve.tolist()
        best = None
        for i, value in enumerate(values):  # strict '>': the smallest α wins a tie
            if not math.isnan(value) and (best is None or value > values[best]):
                best = i
        if best is not None:
            self._searched_alpha = alphas[best]
        return values

    def _snapshot_norm_stats(self) -> None:
        if not self._norm_layers:
            return
        live = [
            buf
            for m in self._norm_layers
            if m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        if len(live) != len(self._norm_saved):
            self._norm_saved = [buf.clone() for buf in live]
        else:
            torch._foreach_copy_(self._norm_saved, live)
        self._norm_live = live

    def _restore_norm_stats(self) -> None:
        if self._norm_live:
            torch._foreach_copy_(self._norm_live, self._norm_saved)
            self._norm_live = []

    def _abandon_step(self) -> None:
        """Put θ₀ and the BN statistics back after a closure raised mid-step."""
        if self._ascents:
            with torch.no_grad():
                _copy_each(self._active, self._theta0)
            self._restore_norm_stats()
        self._ascents = 0
        self._active = []


# -- settings and closures ---------------------------------------------------------------------


def _validated(values: Mapping[str, Any], label: Callable[[str], str]) -> _Settings:
    """`values` (by argument name) checked; `label(name)` starts each error message."""
    rho, steps, alpha = values["rho"], values["steps"], values["alpha"]
    rho_max, alpha_max, alpha_delta = values["rho_max"], values["alpha_max"], values["alpha_delta"]
    eps, foreach = values["eps"], values["foreach"]
    if not _is_number(rho) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{label('rho')}: must be a finite number >= 0 (got {rho!r})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{label('steps')}: must be an integer >= 1 (got {steps!r})")
    if not _is_number(alpha_max) or not math.isfinite(alpha_max) or alpha_max <= 0:
        raise ValueError(f"{label('alpha_max')}: must be a finite number > 0 (got {alpha_max!r})")
    if not _is_number(alpha_delta) or not math.isfinite(alpha_delta) or alpha_delta <= 0:
        raise ValueError(
            f"{label('alpha_delta')}: must be a finite number > 0 (got {alpha_delta!r})"
        )
    probes = alpha_probe_count(alpha_max, alpha_delta)
    if probes > MAX_ALPHA_PROBES:
        raise ValueError(
            f"{label('alpha_delta')}: alpha_max/alpha_delta gives {probes} α probes, at most "
            f"{MAX_ALPHA_PROBES} allowed (got alpha_delta={alpha_delta!r})"
        )
    if alpha != "dynamic" and (
        not _is_number(alpha) or not math.isfinite(alpha) or not 0 <= alpha <= alpha_max
    ):
        raise ValueError(
            f'{label("alpha")}: must be "dynamic" or a number in [0, alpha_max={alpha_max}] '
            f"(got {alpha!r})"
        )
    if rho_max is None:
        rho_max = 2 * rho
    elif not _is_number(rho_max) or not math.isfinite(rho_max) or rho_max < rho:
        raise ValueError(
            f"{label('rho_max')}: must be a finite number >= rho={rho} (got {rho_max!r})"
        )
    if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{label('eps')}: must be a finite number > 0 (got {eps!r})")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"{label('foreach')}: must be a bool or None (got {foreach!r})")
    return _Settings(
        rho=float(rho),
        steps=steps,
        alpha="dynamic" if alpha == "dynamic" else float(alpha),
        rho_max=float(rho_max),
        alpha_max=float(alpha_max),
        alpha_delta=float(alpha_delta),
        eps=float(eps),
        foreach=True if foreach is None else foreach,
        probes=probes,
    )


def _common_settings(groups: list[dict[str, Any]]) -> _Settings:
    """The settings every group holds; ValueError when one is invalid or differs between groups.

    XSAM's geometry is global (norms, φ and α over one flat vector of all parameters), so a
    per-group value could only be ignored or refused: it is refused.
    """
    if not groups:
        raise ValueError("param_groups: XSAM has no parameter group")
    for key in GROUP_KEYS.values():
        for i, group in enumerate(groups):
            value = group.get(key, _MISSING)
            if value is _MISSING:
                raise ValueError(f"{key}: missing from param group {i}")
            if i and not _same(value, groups[0][key]):
                raise ValueError(
                    f"{key}: must be the same in every param group, as XSAM's geometry is "
                    f"global (one flat vector over all parameters); group 0 has "
                    f"{groups[0][key]!r}, group {i} has {value!r}"
                )
    return _validated(
        {name: groups[0][key] for name, key in GROUP_KEYS.items()}, lambda name: GROUP_KEYS[name]
    )


def _grid(settings: _Settings) -> list[float]:
    return [round(i * settings.alpha_delta, 12) for i in range(settings.probes)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):  # e.g. a tensor lr
        return isinstance(a, Tensor) and isinstance(b, Tensor) and bool(torch.equal(a, b))
    return bool(a == b)


def _refuse_bare_names(groups: Iterable[Mapping[str, Any]], base: Optimizer) -> None:
    """A group key such as ``rho`` that the base optimizer does not read would be ignored."""
    for i, group in enumerate(groups):
        for name, key in GROUP_KEYS.items():
            if name in group and name not in base.defaults:
                raise ValueError(
                    f"{name}: param group {i} sets {name!r}, which {type(base).__name__} does "
                    f"not read; XSAM's setting in a param group is {key!r}"
                )


def _carry_given_values(
    given: list[dict[str, Any]], explicit: list[set[str]], shared: list[dict[str, Any]]
) -> None:
    """Put what the groups given to XSAM set into the base optimizer's groups, or refuse.

    With a base optimizer built by the caller, XSAM's own groups are dropped for the base's; a
    value set there (an ``lr``, an ``xsam_rho``) must reach the base's groups, not vanish.
    """
    for i, (group, keys) in enumerate(zip(given, explicit, strict=True)):
        mine = {id(p) for p in group["params"]}
        for j, other in enumerate(shared):
            if other is group or not mine & {id(p) for p in other["params"]}:
                continue
            for key in sorted(keys):
                if key not in other:
                    other[key] = group[key]
                elif not _same(other[key], group[key]):
                    raise ValueError(
                        f"{key}: param group {i} given to XSAM sets {group[key]!r}, but the "
                        f"base optimizer's group {j} (same parameters) has {other[key]!r}; "
                        "set it in one place"
                    )


def _as_list(params: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _takes_backward(closure: Closure) -> bool:
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): call it plainly
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        (p.name == "backward" and p.kind in keyword) or p.kind == inspect.Parameter.VAR_KEYWORD
        for p in parameters
    )


def _training_pass(closure: Closure) -> Callable[[], Any]:
    """A forward+backward with `closure`: ``closure(backward=True)``, or a plain ``closure()``."""
    return functools.partial(closure, backward=True) if _takes_backward(closure) else closure


def _require_probe_closure(closure: Closure) -> None:
    if not _takes_backward(closure):
        raise ValueError(
            "closure: the α search (search_alpha=True with alpha='dynamic') evaluates the loss "
            "forward-only at each probe, so it needs closure(backward=True) -> loss that skips "
            "loss.backward() when called with backward=False; this closure takes no "
            "'backward' argument. Add one, or pass search_alpha=False (or a fixed alpha)"
        )


# -- vector math: a foreach path and a plain per-tensor path that does the same ----------------


def _multi_tensor_ascend(
    params: list[Tensor],
    grads: list[Tensor],
    theta0: list[Tensor],
    disp: list[Tensor],
    scale: Tensor,
    first: bool,
) -> None:
    if first:
        torch._foreach_copy_(theta0, params)
    torch._foreach_mul_(grads, scale)  # the gradient is spent: it becomes this ascent step
    torch._foreach_add_(params, grads)
    if first:
        torch._foreach_copy_(disp, grads)
    else:
        torch._foreach_add_(disp, grads)


def _single_tensor_ascend(
    params: list[Tensor],
    grads: list[Tensor],
    theta0: list[Tensor],
    disp: list[Tensor],
    scale: Tensor,
    first: bool,
) -> None:
    for p, g, t0, dp in zip(params, grads, theta0, disp, strict=True):
        if first:
            t0.copy_(p)
        g.mul_(scale)
        p.add_(g)
        if first:
            dp.copy_(g)
        else:
            dp.add_(g)


def _multi_tensor_plane(
    params: list[Tensor], grads: list[Tensor], disp: list[Tensor], ratio: Tensor
) -> None:
    # In: disp = a·v₀, grads = g_k, ratio = a/(s + ε). Out: grads = a·v₁,
    # params = a(v₀ − v₁), disp = a(v₀ + v₁).
    torch._foreach_mul_(grads, ratio)
    torch._foreach_copy_(params, disp)
    torch._foreach_sub_(params, grads)
    torch._foreach_add_(disp, grads)


def _single_tensor_plane(
    params: list[Tensor], grads: list[Tensor], disp: list[Tensor], ratio: Tensor
) -> None:
    for p, g, dp in zip(params, grads, disp, strict=True):
        g.mul_(ratio)
        p.copy_(dp)
        p.sub_(g)
        dp.add_(g)


def _multi_tensor_direction(
    grads: list[Tensor], disp: list[Tensor], coef_v1: Tensor, coef_sum: Tensor
) -> None:
    torch._foreach_mul_(grads, coef_v1)
    torch._foreach_mul_(disp, coef_sum)
    torch._foreach_add_(grads, disp)


def _single_tensor_direction(
    grads: list[Tensor], disp: list[Tensor], coef_v1: Tensor, coef_sum: Tensor
) -> None:
    for g, dp in zip(grads, disp, strict=True):
        g.mul_(coef_v1)
        dp.mul_(coef_sum)
        g.add_(dp)


def _multi_tensor_place(
    params: list[Tensor],
    theta0: list[Tensor],
    grads: list[Tensor],
    disp: list[Tensor],
    x: float,
    y: float,
) -> None:
    torch._foreach_copy_(params, theta0)
    torch._foreach_add_(params, grads, alpha=x)
    torch._foreach_add_(params, disp, alpha=y)


def _single_tensor_place(
    params: list[Tensor],
    theta0: list[Tensor],
    grads: list[Tensor],
    disp: list[Tensor],
    x: float,
    y: float,
) -> None:
    for p, t0, g, dp in zip(params, theta0, grads, disp, strict=True):
        p.copy_(t0)
        p.add_(g, alpha=x)
        p.add_(dp, alpha=y)


def _copy_each(dst: list[Tensor], src: list[Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


def _global_norm(tensors: list[Tensor], dtype: torch.dtype, foreach: bool) -> Tensor:
    norm: Tensor = torch.linalg.vector_norm(torch.stack(_norms(tensors, dtype, foreach)))
    return norm


def _global_norm_pair(
    first: list[Tensor], second: list[Tensor], dtype: torch.dtype, foreach: bool
) -> tuple[Tensor, Tensor]:
    """‖first‖ and ‖second‖ (each over all its tensors) from one pass."""
    norms = torch.stack(_norms(first + second, dtype, foreach)).view(2, len(first))
    both = torch.linalg.vector_norm(norms, dim=1)
    return both[0], both[1]


def _norms(tensors: list[Tensor], dtype: torch.dtype, foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


def _slerp_coefficients(
    phi: Tensor, alpha: float | Tensor, degenerate: Tensor
) -> tuple[Tensor, Tensor]:
    """c₀, c₁ with u(α) = c₀·v₀ + c₁·v₁; (0, 1), i.e. u = v₁, where the plane is degenerate."""
    sin_phi = torch.sin(phi)
    safe = torch.where(degenerate, torch.ones_like(sin_phi), sin_phi)
    c0 = torch.where(degenerate, 0.0, torch.sin((1 - alpha) * phi) / safe)
    c1 = torch.where(degenerate, 1.0, torch.sin(alpha * phi) / safe)
    return c0, c1


def _refuse_narrow_dtypes(params: Iterable[Tensor]) -> None:
    for i, p in enumerate(params):
        if p.is_floating_point() and torch.finfo(p.dtype).bits < 32:
            raise ValueError(
                f"params: XSAM needs float32 (or wider) parameters; parameter {i} of shape "
                f"{tuple(p.shape)} is {p.dtype}, in which the ascent step is mostly rounding "
                "error. Keep float32 weights and use autocast for bf16/fp16 compute"
            )


def _detached(loss: Any) -> Any:
    return loss.detach() if isinstance(loss, Tensor) else loss


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
