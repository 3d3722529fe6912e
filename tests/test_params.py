"""Generation parameters (ChatTTS's names and defaults) and the prompt templates."""
import pytest

from chattts_ort.params import InferCodeParams, RefineTextParams, build_prompt_code, build_prompt_refine


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=0), "temperature"), (dict(temperature=[0.3, 0.3]), "temperature list"),
    (dict(top_P=0), "top_P"), (dict(top_P=1.5), "top_P"), (dict(top_K=0), "top_K"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_token=0), "max_new_token"),
    (dict(min_new_token=-1), "min_new_token"), (dict(manual_seed=-3), "manual_seed")])
def test_params_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        InferCodeParams(**bad).validate()


def test_chattts_defaults():
    p, r = InferCodeParams(), RefineTextParams()
    assert (p.temperature, p.top_P, p.top_K, p.repetition_penalty, p.max_new_token, p.prompt) == \
        (0.3, 0.7, 20, 1.05, 2048, "[speed_5]")
    assert (r.temperature, r.repetition_penalty, r.max_new_token, r.prompt) == (0.7, 1.0, 384, "")
    p.validate(); r.validate()



def test_prompt_templates():
    assert build_prompt_code(" [Stts]hi ", False, None, "[speed_5]") == "[Stts][empty_spk][speed_5]hi[Ptts]"
    assert build_prompt_code("hi", True, "smp", "") == "[Stts][spk_emb]smphi[Ptts]"
    assert build_prompt_refine("hi", "[oral_2]") == "[Sbreak]hi[Pbreak][oral_2]"



def test_documented_minimum_temperature_passes():
    """The ranges hold on the value as float32: float32(1e-4) is just below 1e-4, and 1e-4 is the documented
    minimum (it was refused: "got 0.0001")."""
    from chattts_ort import InferCodeParams

    InferCodeParams(temperature=1e-4).validate()
    InferCodeParams(temperature=[1e-4] * 4).validate(num_vq=4)
    with pytest.raises(ValueError, match="temperature"):
        InferCodeParams(temperature=5e-5).validate()
