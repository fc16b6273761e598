"""Every method on an accelerator, checked on the CPU stand-in device (tests/device_strict.py).

Steps, a checkpoint, a restore with optimizer state, more steps, finalize, extract, export:
no op may mix the device with CPU tensors, and a step may force only a bounded number of
device -> host syncs. A restarted worker used to load the optimizer state while the model was
still on the CPU and move only the weights afterwards: the first step after every resume mixed
devices on a GPU."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.models import unwrap
from search_space.subnet import dummy_input, export_subnet, load_subnet
from tests.device_strict import DEVICE, StrictDevice, mark_steps
from tests.trainers.test_method_contract import STEPS, _batches, _build, _dense
from trainers.checkpoint import save_checkpoint
from trainers.loop import train_one_epoch
from trainers.methods import list_methods
from trainers.search import _restore

# Syncs a step may force. An ordinary step forces none: every per-step decision stays on the
# device or on the host mirror of the method's state. A step that changes the architecture
# (OFB's elimination: drop decisions, slicing indices, the host mirror of `live`) may read a
# few values per searchable module; the epoch's statistics cost one transfer at the end.
ORDINARY_STEP = 0
PER_MODULE_AT_ELIMINATION = 8
AT_EPOCH_END = 1


def _steps(model, batches, opt, method, mode, step_offset=0):
    marks: list[int] = []
    st = train_one_epoch(model, mark_steps(batches, mode, marks), opt, None, DEVICE,
                         grad_clip=5.0, method=method, step_offset=step_offset)
    marks.append(mode.syncs)
    return st, [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _check_syncs(name, method, model, counts):
    modules = len(unwrap(model).searchable()) if hasattr(unwrap(model), "searchable") else 0
    *steps, last = counts
    changing = PER_MODULE_AT_ELIMINATION * modules
    for i, c in enumerate(steps):
        assert c <= max(ORDINARY_STEP, changing), f"{name}: step {i} forced {c} syncs"
    assert last <= max(ORDINARY_STEP, changing) + AT_EPOCH_END, f"{name}: last step {last}"
    if name != "ofb":  # no architecture changes mid-epoch
        assert all(c == ORDINARY_STEP for c in steps), (name, counts)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_on_the_device(name, tmp_path):
    batches = _batches()
    dense_arch = ViTArch.from_timm(_dense())
    with StrictDevice() as mode:
        # wrapped on the device: search buffers are built next to the weights
        method, model, make_opt = _build(name, dense_arch, _dense().to(DEVICE))
        method.setup(DEVICE)
        model.to(DEVICE)
        opt, _ = make_opt(model)
        if not method.finished(model):
            _, counts = _steps(model, batches[:STEPS], opt, method, mode)
            _check_syncs(name, method, model, counts)
        ckpt = save_checkpoint(tmp_path / "ckpt", unwrap(model), {"epoch": 0, "elapsed_s": 0.0},
                               opt, method_state=method.state_dict())
        method2, model2, make_opt2 = _build(name, dense_arch)  # a restarted worker: on the CPU
        method2.setup(DEVICE)
        opt2, _, _ = _restore(ckpt, method2, model2, make_opt2)
        assert all(p.device == DEVICE for p in model2.parameters())
        for state in opt2.state.values():
            assert all(v.device == DEVICE for v in state.values()
                       if torch.is_tensor(v) and v.dim() > 0)
        # mixed devices raise here
        st, counts = _steps(model2, batches[STEPS:], opt2, method2, mode, step_offset=STEPS)
        _check_syncs(name, method2, model2, counts)
        method2.finalize(model2, opt2)
        subnet, arch = method2.extract(model2)  # device-clean extraction
        assert all(p.device == DEVICE for p in subnet.parameters())
        with torch.no_grad():
            logits = subnet(batches[0][0].to(DEVICE))
        folder = export_subnet(subnet, arch, tmp_path / "subnet")
        # ONNX tracing cannot run on the stand-in; its dummy input must be on the device
        assert dummy_input(subnet, arch, 2).device == DEVICE
    assert st.steps == 1 and st.loss > 0
    assert logits.shape == (16, 4)
    torch.testing.assert_close(load_subnet(folder)(batches[0][0]), logits.elem)


def test_supervised_steps_on_the_device():
    """Dense pretraining and fine-tuning share the loop: no mixing, no per-step sync."""
    batches = _batches()
    with StrictDevice() as mode:
        model = _dense().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        st, counts = _steps(model, batches, opt, None, mode)
    assert counts[:-1] == [ORDINARY_STEP] * (len(batches) - 1)
    assert counts[-1] <= AT_EPOCH_END and st.loss > 0
