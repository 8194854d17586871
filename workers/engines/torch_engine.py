"""PyTorch backend: nn.Linear, nn.MSELoss and torch.optim.SGD, as the tutorial trains them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from service.errors import DeviceError
from service.spec import ExplicitInit, JobSpec
from workers.engines.base import Array, Params, TrainData

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(requested: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when there is one) as a concrete device."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "auto":
        return torch.device("cpu")
    raise DeviceError("device: cuda was requested but torch finds no CUDA device on this worker")


def default_init(n_features: int, fit_intercept: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """The float32 numbers of the tutorial's ``torch.manual_seed(seed); nn.Linear(d, 1)``.

    nn.Linear.reset_parameters' draws in its order, from a private generator: nobody's global
    RNG moves and CUDA's lazy seeding is never touched.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty((1, n_features), dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if not fit_intercept:
        return (weight,)
    bound = 1 / math.sqrt(n_features) if n_features > 0 else 0
    bias = torch.empty(1, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    return weight, bias


def initial_linear(spec: JobSpec, n_features: int) -> nn.Linear:
    """The untrained model, on the cpu in the spec's dtype."""
    intercept = spec.model.fit_intercept
    # Its own draws are thrown away (and leave the global RNG where it was): default_init's
    # replace them.
    with torch.random.fork_rng(devices=[]):
        linear = nn.Linear(n_features, 1, bias=intercept, dtype=torch.float32)
    with torch.no_grad():
        drawn = default_init(n_features, intercept, spec.seed)
        for param, value in zip(linear.parameters(), drawn, strict=True):
            param.copy_(value)
    linear = linear.to(DTYPES[spec.dtype])
    init = spec.model.init
    with torch.no_grad():
        if init == "zeros":
            for param in linear.parameters():
                param.zero_()
        elif isinstance(init, ExplicitInit):
            linear.weight.copy_(torch.tensor([init.weights], dtype=torch.float64))
            if init.bias is not None:
                linear.get_parameter("bias").fill_(init.bias)
    return linear


class TorchModel:
    """nn.Linear trained by torch.optim.SGD on one device."""

    def __init__(self, spec: JobSpec, data: TrainData) -> None:
        where = resolve_device(spec.device)
        self.device = str(where)
        self._where = where
        self._dtype = DTYPES[spec.dtype]
        self._linear = initial_linear(spec, data.n_features).to(where)
        self._weight = self._linear.weight
        self._bias = self._linear.get_parameter("bias") if spec.model.fit_intercept else None
        self._params = list(self._linear.parameters())
        self._loss = nn.MSELoss(reduction=spec.loss.reduction)
        # MSELoss(mean) divides a batch's SSE by its rows; this scales it back to the SSE.
        self._sse_per_loss = spec.loss.reduction == "mean"
        options = spec.optimizer
        self._momentum = options.momentum
        self._optimizer = torch.optim.SGD(
            self._params,
            lr=options.lr,
            momentum=options.momentum,
            dampening=options.dampening,
            weight_decay=options.weight_decay,
            nesterov=options.nesterov,
        )
        self._x = self._tensor(data.x)
        self._y = self._tensor(data.y).reshape(-1, 1)
        self._x_test = None if data.x_test is None else self._tensor(data.x_test)
        self._y_test = None if data.y_test is None else self._tensor(data.y_test).reshape(-1, 1)
        self._start = [param.detach().clone() for param in self._params]

    def _tensor(self, values: Array | list[float]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=self._dtype, device=self._where)

    def run_epoch(self, order: npt.NDArray[np.int64] | None, batches: Sequence[slice]) -> float:
        """Step through the batches of rows in ``order``; the sum of their pre-step SSEs."""
        x, y = self._x, self._y
        if order is not None:
            rows = torch.from_numpy(order).to(self._where)
            x, y = x.index_select(0, rows), y.index_select(0, rows)
        self._start = [param.detach().clone() for param in self._params]
        # Summed on the device and read once an epoch: an .item() per batch would wait on a GPU.
        total = torch.zeros((), dtype=torch.float64, device=self._where)
        for batch in batches:
            loss = self._loss(self._linear(x[batch]), y[batch])
            self._optimizer.zero_grad()
            loss.backward()
            self._optimizer.step()
            scale = batch.stop - batch.start if self._sse_per_loss else 1
            total.add_(loss.detach(), alpha=scale)
        return float(total.item())

    def rewind(self) -> None:
        """Put the parameters back where the last ``run_epoch`` found them."""
        with torch.no_grad():
            for param, saved in zip(self._params, self._start, strict=True):
                param.copy_(saved)

    def test_loss(self) -> float:
        """The loss on the test rows at the current parameters."""
        assert self._x_test is not None and self._y_test is not None
        with torch.no_grad():
            return float(self._loss(self._linear(self._x_test), self._y_test).item())

    def parameters(self) -> Params:
        """Weights and bias as float64, copied off the device."""
        return _array(self._weight), None if self._bias is None else float(self._bias.item())

    def momentum_buffers(self) -> Params | None:
        """SGD's momentum buffers (None before the first step or without momentum)."""
        if self._momentum == 0:
            return None
        weight = self._optimizer.state.get(self._weight, {}).get("momentum_buffer")
        if weight is None:
            return None
        bias = None
        if self._bias is not None:
            bias = float(self._optimizer.state[self._bias]["momentum_buffer"].item())
        return _array(weight), bias

    def restore(self, params: Params, momentum: Params | None) -> None:
        """Set parameters and momentum buffers exactly as a checkpoint holds them."""
        weights, bias = params
        with torch.no_grad():
            self._weight.data.copy_(self._tensor(weights).reshape(1, -1))
            if self._bias is not None and bias is not None:
                self._bias.data.copy_(self._tensor([bias]))
        if momentum is None:
            return
        self._optimizer.state[self._weight]["momentum_buffer"] = self._tensor(momentum[0]).reshape(
            1, -1
        )
        if self._bias is not None and momentum[1] is not None:
            self._optimizer.state[self._bias]["momentum_buffer"] = self._tensor([momentum[1]])


def _array(tensor: torch.Tensor) -> Array:
    # copy=True: on a float64 cpu tensor .to() would otherwise hand back the live parameter.
    return tensor.detach().to("cpu", torch.float64, copy=True).reshape(-1).numpy()


def parameters_of(linear: nn.Linear) -> Params:
    """An nn.Linear's weights and bias (None without one) as float64."""
    bias = linear.bias
    return _array(linear.weight), None if bias is None else float(bias.item())
