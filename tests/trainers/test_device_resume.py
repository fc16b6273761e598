"""Resume on an accelerator, checked on the CPU stand-in device (tests/device_strict.py).

A restarted worker used to load the optimizer state while the model was still on the CPU and
move only the weights afterwards: the first step after every resume mixed devices on a GPU."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.models import unwrap
from search_space.subnet import export_subnet, load_subnet
from tests.device_strict import DEVICE, StrictDevice
from tests.trainers.test_method_contract import STEPS, _batches, _build, _dense
from trainers.checkpoint import save_checkpoint
from trainers.loop import train_one_epoch
from trainers.methods import list_methods
from trainers.search import _restore


@pytest.mark.parametrize("name", list_methods())
def test_search_resumes_on_the_device(name, tmp_path):
    batches = _batches()
    dense_arch = ViTArch.from_timm(_dense())
    with StrictDevice():
        method, model, make_opt = _build(name, dense_arch)
        method.setup(DEVICE)
        model.to(DEVICE)
        opt, _ = make_opt(model)
        if not method.finished(model):
            train_one_epoch(model, batches[:STEPS], opt, None, DEVICE, method=method)
        ckpt = save_checkpoint(tmp_path / "ckpt", unwrap(model), {"epoch": 0, "elapsed_s": 0.0},
                               opt, method_state=method.state_dict())
        method2, model2, make_opt2 = _build(name, dense_arch)  # a restarted worker: on the CPU
        method2.setup(DEVICE)
        opt2, _, _ = _restore(ckpt, method2, model2, make_opt2)
        assert all(p.device == DEVICE for p in model2.parameters())
        for state in opt2.state.values():
            assert all(v.device == DEVICE for v in state.values()
                       if torch.is_tensor(v) and v.dim() > 0)
        st = train_one_epoch(model2, batches[STEPS:], opt2, None, DEVICE, method=method2,
                             step_offset=STEPS)  # mixed devices raise here
        method2.finalize(model2, opt2)
        subnet, arch = method2.extract(model2)  # device-clean extraction
        assert all(p.device == DEVICE for p in subnet.parameters())
        with torch.no_grad():
            logits = subnet(batches[0][0].to(DEVICE))
        folder = export_subnet(subnet, arch, tmp_path / "subnet")
    assert st.steps == 1 and st.loss > 0
    assert logits.shape == (16, 4)
    torch.testing.assert_close(load_subnet(folder)(batches[0][0]), logits.elem)
