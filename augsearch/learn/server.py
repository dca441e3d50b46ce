"""One policy learned by N workers: a policy server that averages the workers' policy gradients and steps.

Each worker of a shared search trains its own segmenter (its own seed and shard of the training cases, see
`worker_shard`) and computes, per meta-iteration, the gradient of its outer loss with respect to the TRA logits
(after `centre_and_normalise`, METHOD 4.2 step 9) and of the TEA loss with respect to the TEA logits (step B). It
pushes them as a `Contribution`; the server averages the contributions of a round, takes one Adam step per logit
tensor (the schedule of `fit`: poly decay of augment.tra.lr / augment.tea.lr by epoch) and hands the new logits back.
Averaging N independent gradients divides the noise of a policy step by sqrt(N) (METHOD 13, lever 1).

Rounds are synchronous: a round closes when every live worker has pushed (a barrier), or when `sync_timeout_s` has
passed; workers missing at a timeout leave the live set until they push again, so a dead worker delays one round
and a worker that restarts from its checkpoint simply joins the round that is open. With one worker a round is one
push and the server's Adam sees exactly the gradient `fit` would have stepped on: the search equals the independent
one bit for bit.

Two implementations of one interface (`push`, `join`, `checkpoint`):
- `InProcessPolicyServer`: a plain object, for one worker or a search without Ray;
- `RayPolicyServer`: a client of a named asynchronous Ray actor holding the same `PolicyServerState`, for N workers
  on Ray. This is the only module of learn/ that imports ray (lazily).
The server writes its state (logits, Adam states, round, live workers) atomically to `state_path` whenever a worker
validates; a restarted server (a Ray actor restart, or `--resume` of the search) starts from that file.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from augsearch.atomic import torch_save
from augsearch.config import AugmentConfig, TrainConfig
from augsearch.errors import AugsearchError
from augsearch.schedules import poly_lr, set_lr

STATE_NAME = "policy_server.pt"


class PolicyServerError(AugsearchError):
    """A shared policy that cannot be served: mismatched shapes, too few training cases, an unreachable server."""


@dataclass
class Contribution:
    """What one worker sends after a policy step's worth of meta-iterations.

    tra: d L_val / d tra_logits (G, n_ops, max_bins) or None (no finite TRA gradient); tea: d L_tea / d tea_logits
    (A,) or None. epoch: the worker's epoch, for the learning-rate schedule.
    """

    worker: int
    epoch: int
    tra: Tensor | None
    tea: Tensor | None


@dataclass
class PolicySnapshot:
    """The shared logits after `round` policy steps."""

    round: int
    tra_logits: Tensor
    tea_logits: Tensor


def tra_adam(tra_logits: Tensor, augment: AugmentConfig) -> torch.optim.Adam:
    """The TRA logits' Adam, the same in a run and on the policy server (rate and beta1 from augment.tra)."""
    return torch.optim.Adam([tra_logits], lr=augment.tra.lr, betas=(augment.tra.beta1, 0.999))


def tea_adam(tea_logits: Tensor, augment: AugmentConfig) -> torch.optim.Adam:
    """The TEA logits' Adam, the same in a run and on the policy server (rate from augment.tea)."""
    return torch.optim.Adam([tea_logits], lr=augment.tea.lr)


@dataclass
class PolicyServerState:
    """Logits, their Adam optimisers and the round counter: the arithmetic of the server, free of any transport."""

    augment: AugmentConfig
    train: TrainConfig
    tra_logits: Tensor
    tea_logits: Tensor
    round: int = 0
    live: set[int] = field(default_factory=set)
    contributions: int = 0

    def __post_init__(self) -> None:
        self.tra_logits = self.tra_logits.detach().clone().requires_grad_(True)
        self.tea_logits = self.tea_logits.detach().clone().requires_grad_(True)
        self.tra_optimizer = tra_adam(self.tra_logits, self.augment)
        self.tea_optimizer = tea_adam(self.tea_logits, self.augment)

    def apply(self, contributions: list[Contribution]) -> None:
        """One policy step on the mean of the contributions' gradients (each part over the workers that sent one)."""
        epoch = max(c.epoch for c in contributions)
        t = self.train
        parts = ((self.tra_optimizer, self.tra_logits, [c.tra for c in contributions], self.augment.tra.lr),
                 (self.tea_optimizer, self.tea_logits, [c.tea for c in contributions], self.augment.tea.lr))
        for optimizer, logits, grads, base_lr in parts:
            grads = [g for g in grads if g is not None]
            if not grads:
                continue
            for g in grads:
                if g.shape != logits.shape:
                    raise PolicyServerError(f"a worker sent a gradient of shape {tuple(g.shape)} for logits of shape "
                                            f"{tuple(logits.shape)}; every worker must run the same policy config")
            set_lr(optimizer, poly_lr(base_lr, epoch, t.epochs, t.poly_power))
            grad = grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)
            logits.grad = grad.to(logits.device, logits.dtype)
            optimizer.step()
            logits.grad = None
        self.round += 1
        self.contributions += len(contributions)

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(self.round, self.tra_logits.detach().clone(), self.tea_logits.detach().clone())

    def state_dict(self) -> dict[str, Any]:
        return {"tra_logits": self.tra_logits.detach().clone(), "tea_logits": self.tea_logits.detach().clone(),
                "tra_optimizer": self.tra_optimizer.state_dict(), "tea_optimizer": self.tea_optimizer.state_dict(),
                "round": self.round, "live": sorted(self.live), "contributions": self.contributions}

    def save(self, path: Path) -> None:
        torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: Path, augment: AugmentConfig, train: TrainConfig) -> PolicyServerState:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = cls(augment, train, saved["tra_logits"], saved["tea_logits"], saved["round"], set(saved["live"]),
                    saved["contributions"])
        state.tra_optimizer.load_state_dict(saved["tra_optimizer"])
        state.tea_optimizer.load_state_dict(saved["tea_optimizer"])
        return state


class PolicyServer(Protocol):
    """The interface both servers offer to a worker."""

    def join(self, worker: int, tra_logits: Tensor, tea_logits: Tensor) -> PolicySnapshot:
        """Register `worker`; the first join (with no saved state) sets the initial logits. Returns the current ones."""

    def push(self, contribution: Contribution) -> PolicySnapshot:
        """Send one contribution; returns the logits after the round it joined has closed."""

    def checkpoint(self) -> None:
        """Write the server's state to its state file (atomic)."""


class InProcessPolicyServer:
    """The server as a plain object: every push closes a round (one worker, or a search without Ray)."""

    def __init__(self, augment: AugmentConfig, train: TrainConfig, state_path: Path):
        self.augment, self.train, self.state_path = augment, train, Path(state_path)
        self.state: PolicyServerState | None = None
        if self.state_path.is_file():
            self.state = PolicyServerState.load(self.state_path, augment, train)

    def join(self, worker: int, tra_logits: Tensor, tea_logits: Tensor) -> PolicySnapshot:
        if self.state is None:
            self.state = PolicyServerState(self.augment, self.train, tra_logits.cpu(), tea_logits.cpu())
        self.state.live.add(worker)
        return self.state.snapshot()

    def push(self, contribution: Contribution) -> PolicySnapshot:
        if self.state is None:
            raise PolicyServerError("a worker pushed before joining the policy server; call join first")
        self.state.apply([contribution])
        return self.state.snapshot()

    def checkpoint(self) -> None:
        if self.state is not None:
            self.state.save(self.state_path)


class _Rounds:
    """The synchronous barrier of the Ray actor: collects one contribution per live worker, then steps."""

    def __init__(self, augment: AugmentConfig, train: TrainConfig, state_path: Path, num_workers: int,
                 timeout_s: float):
        self.augment, self.train, self.state_path = augment, train, Path(state_path)
        self.timeout_s = timeout_s
        self.state: PolicyServerState | None = None
        self.expected = set(range(num_workers))  # before a first round every worker is awaited
        self.resumed_from: int | None = None  # the round of the state file this server started from
        if self.state_path.is_file():
            self.state = PolicyServerState.load(self.state_path, augment, train)
            self.resumed_from = self.state.round
        self.pending: dict[int, Contribution] = {}
        self.closed = asyncio.Event()
        self.timeouts = 0

    def join(self, worker: int, tra_logits: Tensor, tea_logits: Tensor) -> PolicySnapshot:
        if self.state is None:
            self.state = PolicyServerState(self.augment, self.train, tra_logits.cpu(), tea_logits.cpu(),
                                           live=set(self.expected))
            self.state.save(self.state_path)  # a server restarted before the first validation resumes from here
        self.state.live.add(worker)
        return self.state.snapshot()

    async def push(self, contribution: Contribution) -> PolicySnapshot:
        if self.state is None:
            raise PolicyServerError("a worker pushed before joining the policy server; call join first")
        self.state.live.add(contribution.worker)
        self.pending[contribution.worker] = contribution
        closed = self.closed
        if set(self.pending) >= self.state.live:
            self._close()
        else:
            try:
                await asyncio.wait_for(asyncio.shield(closed.wait()), self.timeout_s)
            except TimeoutError:
                if closed is self.closed:  # still the same round: step without the absent workers
                    self.timeouts += 1
                    self.state.live = set(self.pending)
                    self._close()
        return self.state.snapshot()

    def _close(self) -> None:
        contributions = [self.pending[w] for w in sorted(self.pending)]
        self.pending = {}
        self.state.apply(contributions)
        self.closed.set()
        self.closed = asyncio.Event()

    def checkpoint(self) -> None:
        if self.state is not None:
            self.state.save(self.state_path)

    def info(self) -> dict[str, Any]:
        state = self.state
        return {"round": state.round if state else 0, "live": sorted(state.live) if state else [],
                "contributions": state.contributions if state else 0, "timeouts": self.timeouts,
                "resumed_from": self.resumed_from}


def state_path(run_dir: Path, group: int = 0) -> Path:
    """The state file of group `group`'s policy server in a search directory (group 0: STATE_NAME)."""
    return Path(run_dir) / (STATE_NAME if group == 0 else f"policy_server_{group}.pt")


def actor_name(run_dir: Path, group: int = 0) -> str:
    """The Ray actor name of group `group`'s policy server: one per search directory and group."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return f"augsearch-policy-{digest}" + (f"-{group}" if group else "")


def start_ray_server(run_dir: Path, group: int, augment: AugmentConfig, train: TrainConfig, num_workers: int,
                     timeout_s: float) -> Any:
    """Create (or find) a group's policy server actor; Ray restarts it from its state file when it dies."""
    import ray

    actor_cls = ray.remote(_Rounds).options(
        name=actor_name(run_dir, group), get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
        max_concurrency=max(16, 4 * num_workers),
    )
    return actor_cls.remote(augment, train, state_path(run_dir, group), num_workers, timeout_s)


class RayPolicyServer:
    """A worker's client of the search's policy server actor (found by name)."""

    def __init__(self, name: str):
        import ray

        try:
            self.actor = ray.get_actor(name)
        except ValueError:
            raise PolicyServerError(f"no policy server named {name!r} in this Ray cluster; a shared search starts "
                                    f"it in the driver before its workers") from None

    def join(self, worker: int, tra_logits: Tensor, tea_logits: Tensor) -> PolicySnapshot:
        import ray

        return ray.get(self.actor.join.remote(worker, tra_logits.detach().cpu(), tea_logits.detach().cpu()))

    def push(self, contribution: Contribution) -> PolicySnapshot:
        import ray

        return ray.get(self.actor.push.remote(contribution))

    def checkpoint(self) -> None:
        import ray

        ray.get(self.actor.checkpoint.remote())


class PolicySync:
    """A worker's side of a shared policy: sends its gradients and copies the server's logits into its policy."""

    def __init__(self, server: PolicyServer, worker: int):
        self.server = server
        self.worker = worker
        self.epoch = 0
        self.round = 0

    def join(self, policy: Any) -> None:
        """Register and adopt the server's current logits (after a restart: the pooled policy, not the stale copy)."""
        self._adopt(policy, self.server.join(self.worker, policy.tra_logits, policy.tea_logits))

    def exchange(self, policy: Any, tra: Tensor | None, tea: Tensor | None) -> None:
        """Push this worker's gradients (either may be None) and adopt the stepped logits."""
        contribution = Contribution(self.worker, self.epoch, _cpu(tra), _cpu(tea))
        self._adopt(policy, self.server.push(contribution))

    def checkpoint(self) -> None:
        self.server.checkpoint()

    def _adopt(self, policy: Any, snapshot: PolicySnapshot) -> None:
        with torch.no_grad():
            policy.tra_logits.copy_(snapshot.tra_logits)
            policy.tea_logits.copy_(snapshot.tea_logits)
        self.round = snapshot.round


def _cpu(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.detach().cpu()


def worker_shard(cases: list, worker: int, num_workers: int) -> list:
    """Worker `worker`'s training cases: every num_workers-th case (in split order) from position `worker`.

    The shards are disjoint and cover all cases; one worker keeps them all.
    """
    if num_workers > len(cases):
        raise PolicyServerError(f"search.num_workers={num_workers} workers need at least as many training cases, "
                                f"got {len(cases)}; lower search.num_workers or add training cases")
    return cases[worker::num_workers]
