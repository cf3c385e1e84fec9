"""``from_diffusers``: DDIM, DDIM-inverse and DPM-Solver++ multistep schedulers (or configs) accepted,
any other class refused unless DDIM is asked for explicitly (``as_ddim=True``)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
)

import fastddim  # noqa: E402

OTHERS = [EulerDiscreteScheduler, DDPMScheduler]
# Other classes, whose bare config (no _class_name) must not be read as DDIM's
NOT_DDIM = [DPMSolverMultistepScheduler, *OTHERS]
KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
          timestep_spacing="trailing")


def same(a: dict, b: dict) -> bool:
    """Two from_diffusers results are equal (schedules by their alphas_cumprod)."""
    return (a.keys() == b.keys() and torch.equal(a["schedule"].alphas_cumprod, b["schedule"].alphas_cumprod)
            and {k: v for k, v in a.items() if k != "schedule"} == {k: v for k, v in b.items() if k != "schedule"})


@pytest.mark.parametrize("cls", [DDIMScheduler, DDIMInverseScheduler])
def test_ddim_schedulers_and_their_configs_are_accepted(cls):
    s = cls(clip_sample=False, **KW)
    args = fastddim.from_diffusers(s)
    assert torch.equal(args["schedule"].alphas_cumprod, s.alphas_cumprod)
    assert (args["prediction_type"], args["spacing"], args["clip_sample"]) == ("v_prediction", "trailing", False)
    saved = {**s.config, "_class_name": cls.__name__}  # as scheduler_config.json holds it
    for source in (dict(s.config), saved, s.config):
        assert same(fastddim.from_diffusers(source), args)


def test_hand_written_config_without_class_name_is_read_as_ddim():
    args = fastddim.from_diffusers({"beta_schedule": "scaled_linear", "clip_sample": False})
    assert torch.equal(args["schedule"].alphas_cumprod, DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod)
    assert args["clip_sample"] is False


@pytest.mark.parametrize("cls", OTHERS)
def test_other_schedulers_are_refused_naming_the_class(cls):
    s = cls(**KW)
    for source in (s, {**s.config, "_class_name": cls.__name__}):
        with pytest.raises(ValueError, match=cls.__name__) as e:
            fastddim.from_diffusers(source)
        assert "as_ddim=True" in str(e.value) and "DDIMScheduler.from_config" in str(e.value)


@pytest.mark.parametrize("cls", NOT_DDIM)
def test_other_schedulers_bare_config_is_refused_naming_the_keys(cls):
    """A config without _class_name holding another scheduler's options is not silently DDIM."""
    cfg = dict(cls(**KW).config)
    with pytest.raises(ValueError, match="not DDIMScheduler options") as e:
        fastddim.from_diffusers(cfg)
    assert "as_ddim=True" in str(e.value)


def test_subclass_of_ddim_is_refused():
    """A subclass may change step(): it is not assumed to be DDIM."""
    class MyDDIM(DDIMScheduler):
        pass

    with pytest.raises(ValueError, match="MyDDIM"):
        fastddim.from_diffusers(MyDDIM())
    assert same(fastddim.from_diffusers(MyDDIM(), as_ddim=True), fastddim.from_diffusers(DDIMScheduler()))


@pytest.mark.parametrize("cls", NOT_DDIM)
def test_as_ddim_reads_the_config_as_ddim_from_config_does(cls):
    s = cls(**KW)
    want = fastddim.from_diffusers(DDIMScheduler.from_config(s.config))
    for source in (s, dict(s.config), {**s.config, "_class_name": cls.__name__}):
        got = fastddim.from_diffusers(source, as_ddim=True)
        assert same(got, want)
    assert torch.equal(want["schedule"].alphas_cumprod, s.alphas_cumprod)
    assert want["clip_sample"] is True  # DDIMScheduler's default, filled in: why it must be asked for


def test_dpm_solver_scheduler_maps_to_the_dpm_solver():
    """The one-line wiring: the class (or its saved config) gives solver='dpm++2m' and its options."""
    s = DPMSolverMultistepScheduler(use_karras_sigmas=True, prediction_type="v_prediction")
    for source in (s, {**s.config, "_class_name": "DPMSolverMultistepScheduler"}):
        args = fastddim.from_diffusers(source)
        assert (args["solver"], args["use_karras_sigmas"], args["prediction_type"]) == ("dpm++2m", True, "v_prediction")
        assert torch.equal(args["schedule"].alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError, match="solver_type='heun'"):
        fastddim.from_diffusers(DPMSolverMultistepScheduler(solver_type="heun"))


def test_bad_arguments():
    with pytest.raises(TypeError, match="as_ddim"):
        fastddim.from_diffusers(DDIMScheduler(), as_ddim=1)
    with pytest.raises(TypeError, match="scheduler"):
        fastddim.from_diffusers(42)
    with pytest.raises(ValueError, match="UNet2DModel"):  # anything with a .config is checked by its class
        fastddim.from_diffusers(diffusers.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4,
                                                      down_block_types=("DownBlock2D",) * 2,
                                                      up_block_types=("UpBlock2D",) * 2))
