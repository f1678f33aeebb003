"""One identity across methods: ExPO at alpha and DeRa's weight mixing at lambda = 1 + alpha build the
same weights theta_0 + (1 + alpha)(theta_1 - theta_0), and DeRa's logit mixing agrees with them to
first order in theta_1 - theta_0 (the gap shrinks quadratically): why extrapolating weights works."""

import copy

import pytest
import torch

import dera
import expo
from conftest import TOY


@pytest.fixture(scope="module")
def sft_and_dpo():
    return (dera.load_model(str(TOY / "sft"), False).eval(),
            dera.load_model(str(TOY / "dpo"), False).eval())


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_expo_and_dera_weight_mixing_build_the_same_weights(sft_and_dpo, alpha):
    sft, dpo = sft_and_dpo
    combined = dera.combine_weights(sft, [dpo], [1.0 + alpha]).state_dict()
    sft_state, dpo_state = sft.state_dict(), dpo.state_dict()
    for name, theta in combined.items():
        extrapolated = expo.extrapolate(sft_state[name], dpo_state[name], alpha)
        scale = extrapolated.abs().max().clamp(min=1e-12)
        assert (theta - extrapolated).abs().max() / scale < 1e-6, name
    # and it is an extrapolation: past the aligned model, away from the SFT one
    name = "model.layers.0.mlp.up_proj.weight"
    step = dpo_state[name] - sft_state[name]
    assert torch.allclose(combined[name] - dpo_state[name], alpha * step, atol=1e-6)


def test_dera_logit_mixing_matches_weight_mixing_to_first_order(sft_and_dpo):
    sft, dpo = (copy.deepcopy(m).double() for m in sft_and_dpo)
    ids = torch.tensor([[1, 5, 17, 40, 3, 9, 22, 31]])
    lam = 2.0  # ExPO's alpha = 1
    h_ref = sft(input_ids=ids).logits[0]
    sft_state, delta = sft.state_dict(), {k: dpo.state_dict()[k] - v for k, v in sft.state_dict().items()}
    gaps = []
    for eps in (0.2, 0.1, 0.05):  # an aligned model eps of the way from SFT to DPO
        aligned = copy.deepcopy(sft)
        aligned.load_state_dict({k: v + eps * delta[k] for k, v in sft_state.items()})
        by_logits = dera.realigned_logits(h_ref, aligned(input_ids=ids).logits[0], lam)  # Eq. 9
        by_weights = dera.combine_weights(sft, [aligned], [lam])(input_ids=ids).logits[0]
        gaps.append((by_logits.double() - by_weights).abs().max().item())
    assert gaps[0] > 1e-6  # the two modes really differ at second order
    for big, small in zip(gaps, gaps[1:]):
        assert 3.0 < big / small < 5.0, gaps  # halving the difference quarters the gap
