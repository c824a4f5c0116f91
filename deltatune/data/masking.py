"""Loss policies: pure functions from token roles to per-token loss weights.

| policy          | system | template | role | instruction | input | response | special |
|-----------------|--------|----------|------|-------------|-------|----------|---------|
| response        | 0      | 0        | 0    | 0           | 0     | 1        | 0       |
| instruction     | 1*     | 1        | 0    | 1           | 1     | 1        | 0       |
| no-boilerplate  | 0*     | 0        | 0    | 1           | 1     | 1        | 0       |
| all             | 1*     | 1        | 1    | 1           | 1     | 1        | 1       |
| weighted:λ      | 0*     | λ_t      | λ_t  | λ           | λ     | 1        | λ_t     |
(*) `train_system` overrides the default: the system prompt then weighs what an instruction weighs.
λ_t (`template=`, default 0) is the spec's λ_template (methods.md section 7) for the template tokens: the
role markers and the constant scaffold (`TEMPLATE_ROLES`), under every template: `weighted:0.1,template=0.05`.
The end-of-turn token that closes a response is `response` and keeps weight 1. `weighted:1` (λ_t 0) is
`no-boilerplate`, the spec's IM = (1, 0, 1); `weighted:0` is `response`, IT = (0, 0, 1).

`instruction` is the paper's Instruction Modelling (arXiv 2405.14394): loss on every token except
role markers and special tokens. `no-boilerplate` also drops the constant template text.
With `turns="last"` only the last assistant turn is a target; earlier assistant turns are treated
as prompt context, i.e. they weigh what an instruction weighs under the same policy. An assistant
message marked `"weight": 0` in chat data (OpenAI's fine-tuning format) is such context under every
policy (role `context`, its end-of-turn token included).

The loss is normalised over the whole (accumulated) batch: loss = Σ_t w_t·nll_t / Σ_t w_t.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltatune.data.segments import Role, TokenizedExample
from deltatune.errors import ConfigError

POLICIES = ("response", "instruction", "no-boilerplate", "all", "weighted")
_ALIASES = {
    "no_boilerplate": "no-boilerplate",
    "noboilerplate": "no-boilerplate",
    "it": "response",
    "im": "instruction",
}
_DEFAULT_TRAIN_SYSTEM = {
    "response": False,
    "instruction": True,
    "no-boilerplate": False,
    "all": True,
    "weighted": False,
}
DEFAULT_LAMBDA = 0.1
# The spec's template tokens T: role markers and headers, the constant scaffold, and BOS-like special tokens
# (neither instruction nor output in the spec's three-way split; a BOS is always an example's first token,
# which no policy can train, so its weight shows only in the table).
TEMPLATE_ROLES = (Role.TEMPLATE, Role.ROLE, Role.SPECIAL)


@dataclass(frozen=True)
class LossPolicy:
    """Which tokens carry loss. `lam` is λ for `weighted` and `lam_template` its λ_template (the constant
    template text, e.g. Alpaca's preamble); `turns` is "all" or "last"."""

    name: str
    lam: float = DEFAULT_LAMBDA
    train_system: bool | None = None  # None: the policy's default (see the table above)
    turns: str = "all"
    lam_template: float = 0.0

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.name.lower(), self.name.lower())
        object.__setattr__(self, "name", name)
        if name not in POLICIES:
            raise ConfigError(
                f"unknown loss policy '{self.name}' (choose from {', '.join(POLICIES)})", field="--policy"
            )
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"λ must lie in [0, 1], got {self.lam}", field="--policy")
        if not 0.0 <= self.lam_template <= 1.0:
            raise ConfigError(f"template weight must lie in [0, 1], got {self.lam_template}", field="--policy")
        if self.lam_template and name != "weighted":
            raise ConfigError(f"only 'weighted' takes a template weight (got '{name}')", field="--policy")
        if self.turns not in ("all", "last"):
            raise ConfigError(f"turns must be 'all' or 'last', got '{self.turns}'", field="--policy")

    @property
    def system_trained(self) -> bool:
        return _DEFAULT_TRAIN_SYSTEM[self.name] if self.train_system is None else self.train_system

    def role_weights(self) -> dict[Role, float]:
        """The weight of a token of each role (before the `turns` rule)."""
        w = {role: 0.0 for role in Role}
        if self.name == "response":
            w[Role.RESPONSE] = 1.0
        elif self.name == "instruction":
            for r in (Role.TEMPLATE, Role.INSTRUCTION, Role.INPUT, Role.RESPONSE):
                w[r] = 1.0
        elif self.name == "no-boilerplate":
            for r in (Role.INSTRUCTION, Role.INPUT, Role.RESPONSE):
                w[r] = 1.0
        elif self.name == "all":
            w = {role: 1.0 for role in Role}
        elif self.name == "weighted":
            w[Role.INSTRUCTION] = w[Role.INPUT] = float(self.lam)
            for r in TEMPLATE_ROLES:
                w[r] = float(self.lam_template)
            w[Role.RESPONSE] = 1.0
        w[Role.SYSTEM] = w[Role.INSTRUCTION] if self.system_trained else 0.0
        w[Role.CONTEXT] = w[Role.INSTRUCTION]  # an excluded assistant message is prompt context, as with turns=last
        return w

    def __str__(self) -> str:
        s = f"weighted:{self.lam:g}" if self.name == "weighted" else self.name
        if self.lam_template:
            s += f",template={self.lam_template:g}"
        if self.turns != "all":
            s += f",turns={self.turns}"
        if self.train_system is not None:
            s += f",system={'yes' if self.train_system else 'no'}"
        return s


@dataclass(frozen=True)
class PolicySchedule:
    """`first` until `switch_step` optimizer steps (or `switch_epoch` epochs) have run, then `then`."""

    first: LossPolicy
    then: LossPolicy
    switch_step: int | None = None
    switch_epoch: int | None = None

    def __post_init__(self) -> None:
        if (self.switch_step is None) == (self.switch_epoch is None):
            raise ConfigError(
                "a two-phase policy needs exactly one of a switch step or a switch epoch", field="--policy"
            )
        if (self.switch_step or 0) < 0 or (self.switch_epoch or 0) < 0:
            raise ConfigError("the switch point must not be negative", field="--policy")

    def policy_at(self, step: int, epoch: int = 0) -> LossPolicy:
        """The policy for 0-based optimizer step `step` in 0-based epoch `epoch`."""
        if self.switch_step is not None:
            return self.first if step < self.switch_step else self.then
        return self.first if epoch < self.switch_epoch else self.then

    @property
    def name(self) -> str:
        return str(self)

    def __str__(self) -> str:
        at = f"{self.switch_step}" if self.switch_step is not None else f"{self.switch_epoch}ep"
        return f"{self.first}->{self.then}@{at}"


def turns_trained(policy: LossPolicy | PolicySchedule) -> str:
    """ "last" when some phase of `policy` trains each record's last answer alone (then an example whose last
    answer truncation cut away trains nothing there, and data preparation drops it), else "all"."""
    phases = (policy.first, policy.then) if isinstance(policy, PolicySchedule) else (policy,)
    return "last" if any(p.turns == "last" for p in phases) else "all"


def policy_weights(example: TokenizedExample, policy: LossPolicy) -> list[float]:
    """Weight of each token of `example` as a prediction target under `policy`."""
    if isinstance(policy, PolicySchedule):
        raise TypeError("pass schedule.policy_at(step, epoch), not the schedule itself")
    table = policy.role_weights()
    weights = [table[r] for r in example.roles]
    if policy.turns == "last":
        resp_turns = [t for r, t in zip(example.roles, example.turns) if r is Role.RESPONSE]
        if resp_turns:
            # the record's last answer, even when truncation cut it away (then every answer left is context)
            last = example.last_response_turn if example.last_response_turn is not None else max(resp_turns)
            context = table[Role.INSTRUCTION]
            weights = [
                context if (r is Role.RESPONSE and t != last) else w
                for w, r, t in zip(weights, example.roles, example.turns)
            ]
    return weights


def unused_template_weight(examples: list[TokenizedExample], policy: LossPolicy, template: str) -> str | None:
    """A one-line warning when `template=λ_t` changes no trained weight (the `raw` template and plain text have
    no template tokens after an example's first token, which never trains), else None: an option that does
    nothing should not pass silently."""
    if isinstance(policy, PolicySchedule):
        found = [unused_template_weight(examples, p, template) for p in (policy.first, policy.then)]
        return next((f for f in found if f), None)
    if not policy.lam_template:
        return None
    if any(r in TEMPLATE_ROLES for ex in examples for r in ex.roles[1:]):
        return None
    return (
        f"warning: policy '{policy}': template={policy.lam_template:g} changes no weight, since template "
        f"'{template}' puts no template tokens (role markers, constant scaffold) in this data"
    )


def parse_policy(spec: str) -> LossPolicy | PolicySchedule:
    """Parse a CLI policy string.

    Grammar: `POLICY[:λ][,template=λ_t][,turns=last|all][,system=yes|no]`, or a two-phase schedule
    `POLICY->POLICY@N` (switch after N optimizer steps) or `POLICY->POLICY@Nep` (after N epochs).
    Examples: "response", "weighted:0.1", "no-boilerplate,system=yes", "instruction->response@100".
    """
    spec = spec.strip()
    if "->" in spec:
        first, _, rest = spec.partition("->")
        then, sep, at = rest.rpartition("@")
        if not sep:
            raise ConfigError(
                f"two-phase policy '{spec}' needs a switch point: FIRST->THEN@STEPS or @EPOCHSep", field="--policy"
            )
        m = re.fullmatch(r"(\d+)\s*(ep|epochs?|steps?)?", at.strip().lower())
        if m is None:
            raise ConfigError(
                f"switch point '{at}' is not a whole number of steps or epochs (like 100 or 2ep)", field="--policy"
            )
        n, unit = int(m.group(1)), m.group(2) or "steps"
        if n == 0:  # its first phase never trains (and `preview` showed that phase)
            raise ConfigError(
                f"'{spec}' switches at 0, so its first phase never trains; give the second policy alone",
                field="--policy",
            )
        if unit.startswith("ep"):
            return PolicySchedule(_parse_one(first), _parse_one(then), switch_epoch=n)
        return PolicySchedule(_parse_one(first), _parse_one(then), switch_step=n)
    return _parse_one(spec)


def _parse_one(spec: str) -> LossPolicy:
    head, *opts = [p.strip() for p in spec.split(",")]
    name, sep, lam_s = head.partition(":")
    kwargs: dict = {}
    if sep:
        try:
            kwargs["lam"] = float(lam_s)
        except ValueError:
            raise ConfigError(f"λ '{lam_s}' in policy '{spec}' is not a number", field="--policy") from None
        if name.strip().lower() != "weighted":
            raise ConfigError(f"only 'weighted' takes a λ (got '{head}')", field="--policy")
    for opt in opts:
        key, _, value = opt.partition("=")
        key, value = key.strip(), value.strip().lower()
        if key == "turns":
            kwargs["turns"] = value
        elif key == "system" and value in ("yes", "no", "true", "false", "1", "0"):
            kwargs["train_system"] = value in ("yes", "true", "1")
        elif key == "template":
            try:
                kwargs["lam_template"] = float(value)
            except ValueError:
                raise ConfigError(
                    f"template weight '{value}' in policy '{spec}' is not a number", field="--policy"
                ) from None
        else:
            raise ConfigError(
                f"unknown policy option '{opt}' (use template=λ_t, turns=all|last or system=yes|no)", field="--policy"
            )
    return LossPolicy(name.strip(), **kwargs)
