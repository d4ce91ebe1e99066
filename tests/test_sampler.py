import pytest
import torch

from core.errors import InputError
from core.sampler import dynamic_shift_sigmas, euler_step, guide, noise, shifted_sigmas


def test_shifted_schedule_matches_the_wan_test_vectors():
    s = shifted_sigmas(50, shift=5.0)
    assert len(s) == 51 and s[-1] == 0
    expected_head = torch.tensor([1.0, 0.995935, 0.991736])
    expected_tail = torch.tensor([0.172414, 0.092593])
    torch.testing.assert_close(s[:3], expected_head, atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-3:-1], expected_tail, atol=1e-6, rtol=0)


def test_qwen_dynamic_shift_matches_the_test_vectors():
    s = dynamic_shift_sigmas(50, image_seq_len=(1328 // 16) ** 2)
    torch.testing.assert_close(s[:3], torch.tensor([1.0, 0.990988, 0.981768]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-3:], torch.tensor([0.063783, 0.02, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_counts_are_input_errors(steps):
    with pytest.raises(InputError):
        shifted_sigmas(steps)


def test_euler_integrates_a_constant_velocity_exactly():
    x0 = torch.randn(4)
    eps = torch.randn(4)
    sig = shifted_sigmas(7, 3.0)
    x = eps.clone()
    for i in range(7):
        x = euler_step(x, eps - x0, sig[i], sig[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)


def test_guidance_and_rescale():
    pos, neg = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(guide(pos, neg, 1.0), pos)
    v = guide(pos, neg, 4.0, rescale_dim=-1)
    torch.testing.assert_close(v.norm(dim=-1), pos.norm(dim=-1))


def test_noise_is_seeded_and_independent_of_the_global_rng():
    torch.manual_seed(0)
    a = noise((2, 3), seed=7)
    torch.manual_seed(1)
    b = noise((2, 3), seed=7)
    assert torch.equal(a, b) and not torch.equal(a, noise((2, 3), seed=8))
    assert noise((2, 3), seed=7, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_dynamic_shift_with_one_step_goes_from_one_to_zero():
    from core.sampler import dynamic_shift_sigmas

    sigmas = dynamic_shift_sigmas(1, 6889)
    assert sigmas.tolist() == [1.0, 0.0]
