"""Stage 1: the sandwich loss, resuming, starting from a checkpoint, and configs refused before training."""

from __future__ import annotations

import pytest
import torch

from model import load_checkpoint
from model.checkpoint import read_metadata
from model.supernet import SlimUNet, SupernetConfig
from tests.training.conftest import TINY_MODEL, read_log, supernet_config
from training.config import TailorStage
from training.supernet import reconstruction_loss, sandwich_backward, train_supernet


def test_log_mse_loss_counts_every_image_alike_whatever_its_error():
    clean = torch.zeros(2, 3, 8, 8)
    output = clean.clone()
    output[0] += 0.01  # a low-noise image, small error
    output[1] += 0.1  # a high-noise image, large error
    loss = reconstruction_loss("log_mse", output, clean, eps=0.0)
    assert torch.isclose(loss, (torch.log(torch.tensor(1e-4)) + torch.log(torch.tensor(1e-2))) / 2)
    # Halving either image's error lowers the loss by the same amount (log 4 / 2): equal weight per image.
    for index in (0, 1):
        better = output.clone()
        better[index] /= 2
        drop = loss - reconstruction_loss("log_mse", better, clean, eps=0.0)
        assert torch.isclose(drop, torch.log(torch.tensor(4.0)) / 2, atol=1e-5)
    # The batch-mean L1 instead is dominated by the high-noise image.
    l1 = reconstruction_loss("l1", output, clean)
    assert torch.isclose(l1, torch.tensor(0.055))
    teacher = torch.full_like(clean, 0.01)
    with_teacher = reconstruction_loss("log_mse", output, clean, teacher, distill_weight=0.5, eps=0.0)
    expected = (torch.log(torch.tensor(1e-4 + 0.0)) + torch.log(torch.tensor(1e-2 + 0.5 * 0.09 ** 2))) / 2
    assert torch.isclose(with_teacher, expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        reconstruction_loss("l2", output, clean)


def test_widest_weight_scales_only_the_widest_loss_in_the_gradient():
    net = SlimUNet(SupernetConfig.from_dict(TINY_MODEL))
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 16, 16, generator=generator)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    members = [net.slimmest()]

    def gradient(widest_weight: float, with_members: bool) -> tuple[torch.Tensor, float, list[float]]:
        config = TailorStage(widest_weight=widest_weight, grad_clip=1e9)
        net.zero_grad(set_to_none=True)
        widest, member_losses = sandwich_backward(net, noisy, clean, members if with_members else [], config)
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]), widest, member_losses

    alone, loss_1, _ = gradient(1.0, with_members=False)
    tripled, loss_3, _ = gradient(3.0, with_members=False)
    assert loss_3 == pytest.approx(loss_1)  # the loss reported is unweighted
    assert torch.allclose(tripled, 3 * alone, rtol=1e-4, atol=1e-7)
    # With a member, the weight adds (w - 1) times the widest's gradient to the sum, nothing else.
    both_1, _, members_1 = gradient(1.0, with_members=True)
    both_3, _, members_3 = gradient(3.0, with_members=True)
    assert members_3 == pytest.approx(members_1)
    assert torch.allclose(both_3 - both_1, 2 * alone, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(both_1, alone)


def test_unknown_loss_or_save_every_is_refused_before_anything_is_written(photo_dirs, tmp_path):
    with pytest.raises(ValueError, match="unknown loss"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "bad", loss="huber"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="save_every"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "bad", save_every=0))
    assert not (tmp_path / "bad").exists()


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(photo_dirs, tmp_path):
    straight = tmp_path / "straight"
    train_supernet(supernet_config(photo_dirs, straight))
    split = tmp_path / "split"
    train_supernet(supernet_config(photo_dirs, split, stop_at=2))
    assert [r["step"] for r in read_log(split) if "loss_widest" in r] == [1, 2]
    train_supernet(supernet_config(photo_dirs, split), resume=True)
    assert [r["step"] for r in read_log(split) if "loss_widest" in r] == [1, 2, 3, 4]
    a, b = load_checkpoint(straight / "supernet.safetensors"), load_checkpoint(split / "supernet.safetensors")
    for name, tensor in a.net.state_dict().items():
        assert torch.allclose(tensor, b.net.state_dict()[name], atol=1e-6), name
    assert b.provenance["stages"]["supernet"]["steps"] == 4


def test_resume_without_a_state_is_a_clear_error(photo_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "fresh"), resume=True)


def test_init_from_a_checkpoint_starts_from_its_weights_and_records_their_digest(photo_dirs, supernet, tmp_path):
    # lr = 0: one step changes nothing, so the export must equal the source's weights.
    again = train_supernet(supernet_config(photo_dirs, tmp_path / "second", init_from=str(supernet), steps=1,
                                           lr=0.0, lr_min=0.0))
    a, b = load_checkpoint(supernet), load_checkpoint(again)
    for name, tensor in a.net.state_dict().items():
        assert torch.equal(tensor, b.net.state_dict()[name]), name
    assert b.provenance["stages"]["supernet"]["source_tensors_sha256"] == read_metadata(supernet)["tensors_sha256"]
    assert "source_tensors_sha256" not in a.provenance["stages"]["supernet"]  # a fresh run starts from nothing
    other = {**TINY_MODEL, "channels": [16, 16, 32]}
    with pytest.raises(ValueError, match="init_from"):
        train_supernet(supernet_config(photo_dirs, tmp_path / "third", init_from=str(supernet), model=other))
