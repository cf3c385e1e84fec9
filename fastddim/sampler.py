"""The public sampling functions: ``sample``, ``invert``, ``interpolate``.

Each is a thin driver over one prepared run (fastddim/engine.py): every argument is checked
before the model is called once, and the loop reads only the host-side plan (no device sync per
step: the finiteness check is a device flag read once per batch).
"""
from __future__ import annotations

import logging
import numbers
import time
from typing import Any, Callable, Sequence

import torch

from . import reference
from .checks import check_int
from .contract import resolve_schedule, resolve_shape
from .engine import FiniteFlags, Run, prepare, progress_bar
from .guidance import guide, make_guidance
from .schedule import Schedule

__all__ = ["sample", "invert", "interpolate", "info"]

log = logging.getLogger("fastddim")

_LAST_RUN: dict[str, Any] = {}
GRAPH_CHOICES = ("auto", True, False)


def info() -> dict[str, Any]:
    """What fastddim can use here and what the last call ran with.

    Returns a dict: ``version``, ``torch``, ``backends`` (name -> None if usable on the CPU /
    the current CUDA device, else why not), ``last_run`` (backend, device, timesteps, n,
    batch_size, dtype, solver, compile mode and compile seconds, memory format with
    memory_format_reason / probe_ms / copy_bytes (copies.choose_layout's decision and what the
    model copy costs), graph (True only when a captured CUDA graph replayed), graph_replays
    (batches it served) and capture_seconds, seconds of the last ``sample``/``invert`` call).
    """
    from . import __version__
    from .dispatch import available_backends

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {
        "version": __version__,
        "torch": torch.__version__,
        "backends": {str(d): available_backends(d) for d in devices},
        "last_run": dict(_LAST_RUN),
    }


def _record(kind: str, run: Run, n: int, seconds: float, **extra) -> None:
    _LAST_RUN.clear()
    _LAST_RUN.update(
        kind=kind, backend=run.backend, device=str(run.device), timesteps=list(run.plan.timesteps), n=n,
        batch_size=run.batch_size, dtype=str(run.dtype).removeprefix("torch."), compile=run.compile_mode,
        solver=run.plan.solver, compile_seconds=run.compile_seconds, capture_seconds=run.capture_seconds, memory_format=str(run.memory_format).removeprefix("torch."),
        seconds=seconds, copy_bytes=run.copy_bytes, **run.layout.info(), **_guidance_info(run),
    )
    _LAST_RUN.update(extra)
    log.info("%s: backend=%s device=%s n=%d steps=%d %.3fs", kind, run.backend, run.device, n, run.plan.steps, seconds)


def _guidance_info(run: Run) -> dict:
    """What info() says of the guidance: method, weights per step, and the model calls it cost."""
    g = run.guidance
    if g is None:
        return {"guidance": None, "model_calls_per_sample": run.plan.steps}
    return {"guidance": g.method, "guidance_weights": list(g.weights), "guidance_rescale": g.rescale,
            "guidance_interval": g.interval, "guidance_split": g.split, "guided_steps": g.uncond_steps,
            "model_calls_per_sample": run.plan.steps + g.uncond_steps}


def check_graph(graph) -> bool | str:
    """graph= is True, False or "auto" (identity, so 1, 0 or a numpy bool are refused)."""
    if not any(graph is c for c in GRAPH_CHOICES[1:]) and not (isinstance(graph, str) and graph == "auto"):
        raise ValueError(f"graph must be 'auto', True or False, got {graph!r}")
    return graph


def _use_graph(graph, run: Run, callback) -> bool | str:
    """What Run.sample gets: False, True (strict: capture or raise) or "auto" (capture or warn)."""
    device = run.device
    if graph == "auto":
        return "auto" if device.type == "cuda" and callback is None and run.backend != "torch" else False
    if graph and run.backend == "torch":
        raise ValueError("graph=True needs a fused backend: the torch reference draws its noise on the host")
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True captures a CUDA graph and needs a CUDA device, not {device}")
    if graph and callback is not None:
        raise ValueError("graph=True replays the whole trajectory at once: a per-step callback needs graph=False")
    return bool(graph)


# ----------------------------------------------------------------------------------- sample
def sample(
    model: Callable,
    n: int | None = None,
    steps: int = 50,
    *,
    eta: float | str = 0.0,
    schedule: Schedule | None = None,
    spacing: str | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    x_T: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict | None = None,
    progress: bool | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    backend: str = "auto",
    first_index: int = 0,
    check_finite: bool = True,
    compile: bool | str = False,
    memory_format: Any = "auto",
    graph: bool | str = "auto",
    learned_variance: bool = False,
    solver: str = "ddim",
    uncond_kwargs: dict | None = None,
    guidance_scale: float | Sequence[float] = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "cfg",
    guidance_split: bool = False,
    **plan_kwargs,
) -> torch.Tensor:
    """Draw ``n`` samples with DDIM (or DPM-Solver++(2M)) in ``steps`` model calls each.

    Args:
        model: ``model(x_t, t, **model_kwargs)`` with x_t (B, *shape) in ``dtype`` and t an int64
            (B,) tensor; returns the prediction (B, *shape) as a tensor, an object with ``.sample``
            (diffusers ``UNet2DModel``), or a tuple whose first item is it.
        n: number of samples (default 1, or ``len(x_T)`` when x_T is given).
        steps: S, the number of sampling steps (model calls per sample), 1 <= S <= T.
        eta: 0 for DDIM (deterministic), 1 for DDPM on the strided chain, any value >= 0 between
            and beyond, or ``"sigma_hat"`` for the paper's larger-variance DDPM.
        schedule: the training schedule; default ``model.schedule``.
        spacing: ``"uniform"`` (DDIM's default; ``"linspace"`` is ``solver="dpm++2m"``'s), ``"quad"``,
            ``"leading"``, ``"trailing"``, ``"linspace"``
            or an explicit strictly decreasing sequence of timesteps (see ``fastddim.plan.timesteps``;
            ``fastddim.paper_timesteps`` gives the paper code's own).
        shape: the shape of one sample, default ``model.sample_shape`` or the diffusers config.
        seed: noise seed in [0, 2**64); sample i's noise is a pure function of (seed, i, step).
        x_T: (n, *shape) initial noise; default drawn from (seed, first_index + i).
        batch_size: samples per model call (default: 64 on the CPU, up to 1024 on CUDA; memory
            stays flat in n). Sample i's noise and step do not depend on it; the model's own
            arithmetic may (torch's CPU convolutions round differently with the batch size).
        device: where to run (default: the model's device).
        dtype: the dtype of the model's input: ``torch.bfloat16``/``torch.float16`` run the model in
            low precision (a module with fp32 weights is used through a cached converted copy;
            yours is not changed) while the state x_t stays float32; the step writes the next model
            input in ``dtype`` in the same pass.
        model_kwargs: extra keyword arguments for every model call (e.g. class labels). A tensor
            with leading dimension n holds one row per sample and is sliced per batch; one with
            leading dimension 1, or anything else, is passed to every call as is. Floating tensors
            are cast to ``dtype`` like the model input; integer and bool ones pass unchanged.
        progress: a tqdm bar of images (default: when stderr is a terminal).
        callback: ``callback(step, t, x_prev, x0)`` after every step of every batch (eager only).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"``; see ``fastddim.info()``.
        first_index: global index of the first sample (for sharding a large job).
        check_finite: raise if the model ever returns NaN or inf (checked once per batch).
        compile: ``True`` (mode "default") or a torch.compile mode: compile the model once per
            (model, mode, dtype, memory format) and cache it; a partial last batch is padded so every
            call has one shape. Modes that make their own CUDA graphs are refused on CUDA. The
            first call's time (compilation) is in ``info()["last_run"]["compile_seconds"]``.
            Only the model is compiled, not the S-step loop: compiling the whole 10-step loop
            (model + the custom op, fullgraph) was measured slower on the CPU (15.9 s against
            10.4 s for 64 samples of the built-in U-Net, compiling 295 s against 73 s, on a
            loaded 2-core machine), and on CUDA the graph layer removes the loop's launch cost.
        memory_format: ``"auto"`` (default: for a module with 2-D convolutions on (C, H, W)
            samples on a fused backend, a timed probe of both layouts at the batch size decides,
            cached per model, dtype, batch, shape and device; runs under 30 model calls keep the
            model as given until a probe exists; fastddim/copies.py), ``torch.channels_last`` (a
            cached copy: the weights once more) or ``torch.contiguous_format``. What ran and why:
            ``info()["last_run"]`` ``memory_format``, ``memory_format_reason``, ``probe_ms``,
            ``copy_bytes``.
        graph: ``"auto"`` (default: on CUDA with a fused backend and no callback, a CUDA graph of
            the whole trajectory, falling back to the eager loop with a warning if capture fails;
            elsewhere eager), ``True`` (a graph or an error: ``fastddim.graph.CaptureError`` from
            the cause when capture fails; refused on the CPU, with ``backend="torch"`` or a
            callback) or ``False`` (fastddim/graph.py). ``info()["last_run"]["graph"]`` is True
            only when a captured graph replayed.
        learned_variance: the model returns 2C channels (eps and a learned variance, as
            guided-diffusion's ``learn_sigma`` or diffusers' ``variance_type="learned_range"``):
            use the first C (DDIM does not use the variance).
        solver: ``"ddim"`` (default) or ``"dpm++2m"``: DPM-Solver++(2M) (Lu et al. 2022), the
            DDIM update with x0 extrapolated from the last two x0 predictions, as diffusers'
            ``DPMSolverMultistepScheduler`` (``backend="torch"`` equals it bit for bit on the CPU);
            first order on the first step and, with few steps or a zero final sigma, the last.
            Deterministic: ``eta`` must stay 0. Its spacings are ``"linspace"`` (default, as
            diffusers'), ``"leading"``, ``"trailing"`` or explicit timesteps; its plan options are
            ``plan.make_dpm_plan``'s (below). Not for ``invert``.
        uncond_kwargs: classifier-free guidance's unconditional model kwargs (e.g.
            ``{"class_labels": torch.tensor([model.null_class_label])}``, or a negative prompt's
            ``encoder_hidden_states``): the same keys as ``model_kwargs``, tensors with leading
            dimension n (sliced per batch) or 1 (one for all). Needed when any step is guided.
        guidance_scale: w, diffusers' convention ``u + w * (c - u)`` on the raw model output
            (a v-model is guided on v), finite and >= 0; 1 (default) is the conditional model
            alone with no unconditional call. Or a sequence of one weight per step. A guided step
            runs one model call on the doubled batch, the unconditional half first (the Stable
            Diffusion pipeline's order), and the combine happens inside the fused step.
        guidance_rescale: phi in [0, 1] of diffusers' ``rescale_noise_cfg`` (Lin et al. 2023):
            per sample, the guided output rescaled towards the conditional one's std.
        guidance_interval: (t_lo, t_hi): guide only the steps whose timestep lies in it
            (inclusive; Kynkaenniemi et al. 2024); the others call the conditional model alone.
        guidance: ``"cfg"`` (default) or ``"cfg++"`` (Chung et al. 2024: x0 from the guided
            prediction, the direction from the unconditional one; guidance_scale is lambda in
            [0, 1]; DDIM only).
        guidance_split: run a guided step's two halves as two model calls of the batch size
            (less memory) instead of one doubled call. The default batch size halves for a
            doubled call, so a model call holds as many samples as unguided.
        **plan_kwargs: ``steps_offset``, ``prediction_type`` ("epsilon", "sample",
            "v_prediction"), ``clip_sample``, ``clip_sample_range``, ``thresholding``,
            ``dynamic_thresholding_ratio``, ``sample_max_value``; DDIM only: ``set_alpha_to_one``,
            ``use_clipped_model_output``; ``solver="dpm++2m"`` only: ``use_karras_sigmas`` ("DPM++ 2M
            Karras"), ``solver_order`` (2, or 1), ``lower_order_final``, ``final_sigmas_type``
            ("zero" or "sigma_min"). An option of the other solver is refused, naming it.
            ``fastddim.from_diffusers(scheduler)`` returns these (and ``schedule``, ``solver``) for a
            diffusers ``DDIMScheduler`` or ``DPMSolverMultistepScheduler``.

    Returns:
        (n, *shape) float32 tensor on ``device``.
    """
    if n is None:
        n = x_T.shape[0] if isinstance(x_T, torch.Tensor) and x_T.ndim >= 1 else 1
    if x_T is not None and not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    check_graph(graph)
    run = prepare(
        model, n, steps, eta=eta, schedule=schedule, spacing=spacing, shape=shape, seed=seed, first_index=first_index,
        batch_size=batch_size, device=device, dtype=dtype, model_kwargs=model_kwargs, backend=backend, compile=compile,
        memory_format=memory_format, learned_variance=learned_variance, check_finite=check_finite,
        need_x0=callback is not None, x_like=x_T, solver=solver, uncond_kwargs=uncond_kwargs,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
        guidance=guidance, guidance_split=guidance_split, **plan_kwargs,
    )
    use_graph = _use_graph(graph, run, callback)
    t0 = time.perf_counter()
    result = run.sample(n, first_index, x_T, progress=progress, callback=callback, graph=use_graph)
    # What ran, not what was asked for: "auto" after a failed capture replayed nothing.
    _record("sample", run, n, time.perf_counter() - t0, graph=run.graph_replays > 0, graph_replays=run.graph_replays)
    return result


# ----------------------------------------------------------------------------------- invert
def invert(
    model: Callable,
    x0: torch.Tensor,
    steps: int = 50,
    *,
    schedule: Schedule | None = None,
    spacing: str | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    convention: str = "source",
    refine: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_kwargs: dict | None = None,
    progress: bool | None = None,
    check_finite: bool = True,
    compile: bool | str = False,
    memory_format: Any = "auto",
    learned_variance: bool = False,
    solver: str = "ddim",
    uncond_kwargs: dict | None = None,
    guidance_scale: float | Sequence[float] = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "cfg",
    guidance_split: bool = False,
    **plan_kwargs,
) -> torch.Tensor:
    """Encode images to latents with the deterministic DDIM ODE run forward (paper sec. 5.4).

    ``sample(model, x_T=invert(model, x0, S), steps=S)`` reconstructs x0, better as S grows
    (paper Table 2). Use the same ``spacing`` and plan options for both.

    Args:
        x0: (n, *shape) images in the model's data range.
        steps: S, the number of model calls.
        convention: ``"source"`` (default, the paper's Euler encoder: eps evaluated at the lower,
            source timestep of each step; no clipping) or ``"target"`` (null-text inversion and
            diffusers' ``DDIMInverseScheduler``, which it reproduces op for op with
            ``**fastddim.from_diffusers(inverse_scheduler)``: the model evaluated at the higher,
            target timestep, its output converted with the source level, x0 clipped when
            ``clip_sample``/``thresholding`` say so). With ``prediction_type="sample"`` diffusers
            returns NaN on the first step (it divides by sqrt(1 - a) = 0 at the clean image);
            fastddim converts that one step's output with the level of its timestep and stays
            finite (``reference.invert_points``). At the same cost ``"target"`` reconstructs better: on the
            built-in MNIST model, round trip MSE 9.6e-3 against 6.0e-2 at S = 10 (docs/paper_tables.md,
            Table 2's diagnostic rows); ``refine`` does better still.
        refine: fixed-point iterations per step (default 0: the paper's encoder). Each one calls
            the model once more per step and moves x_t towards the latent from which the S-step
            eta = 0 decoder lands exactly on the previous point, so the round trip error falls
            far below the plain encoder's (``reference.refine_invert_step``). Cost: S * (1 + refine)
            model calls.
        other arguments: as in ``sample``; clipping options apply to ``convention="target"`` only
            (the paper's encoder is the ODE) and never to ``refine`` iterations. The encoder's own
            arithmetic is the float32 reference's on every backend (``backend`` only changes how
            the model is called, e.g. channels_last).
        solver: ``"ddim"`` only: DPM-Solver++ inversion is not built (refused before any work).
        uncond_kwargs, guidance_*: classifier-free guidance of every model call, as in ``sample``
            (the interval by each call's timestep; as null-text inversion's guided pass does).
            ``guidance="cfg++"`` is not built for inversion.
    Returns:
        x_T: (n, *shape) float32 on ``device``.
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2:
        raise TypeError("x0 must be a tensor of shape (n, *shape)")
    if convention not in ("source", "target"):
        raise ValueError(f"convention must be 'source' or 'target', got {convention!r}")
    refine = check_int("refine", refine, 0)
    if solver != "ddim":
        raise ValueError(f"solver={solver!r}: invert runs the DDIM ODE only (DPM-Solver++ inversion is not built); "
                         "decode its latents with solver='ddim'")
    if guidance == "cfg++":
        raise ValueError("guidance='cfg++': inversion with CFG++ is not built; use guidance='cfg'")
    if not isinstance(guidance_scale, numbers.Real):  # its model calls are not the plan's steps
        raise TypeError(f"guidance_scale: invert takes one number, got {type(guidance_scale).__name__}")
    n = x0.shape[0]
    schedule = resolve_schedule(model, schedule)
    run = prepare(
        model, n, steps, eta=0.0, schedule=schedule, spacing=spacing, shape=shape, batch_size=batch_size,
        device=device, dtype=dtype, model_kwargs=model_kwargs, compile=compile, memory_format=memory_format,
        learned_variance=learned_variance, check_finite=check_finite, x_like=x0, uncond_kwargs=uncond_kwargs,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
        guidance=guidance, guidance_split=guidance_split, **plan_kwargs,
    )
    if tuple(x0.shape[1:]) != run.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected (n, *{run.shape})")
    points = reference.invert_points(run.plan, schedule.alphas_cumprod, convention)
    t_evals = [t for p in points for t in (p.t_eval, *[p.t_dst] * refine)]  # model calls, in order
    if run.guidance is not None:  # the same guidance, tabled per model call (the interval by its timestep)
        g = run.guidance
        run.guidance = make_guidance(t_evals, guidance_scale, g.rescale, g.interval, g.method, g.uncond_kwargs,
                                     model_kwargs, n, g.split)
    run.flags = FiniteFlags(len(t_evals), run.device, run.check_finite)  # one flag per model call
    t0 = time.perf_counter()
    result = torch.empty((n, *run.shape), dtype=torch.float32, device=run.device)
    bar = progress_bar(n, progress, "fastddim invert", "img")
    try:
        with torch.inference_mode():
            for start in range(0, n, run.batch_size):
                x = x0[start:start + run.batch_size].to(device=run.device, dtype=torch.float32)
                result[start:start + x.shape[0]] = _invert_batch(run, x, start, points, refine, t_evals)
                if bar is not None:
                    bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
    # backend "torch": the encoder's arithmetic is the reference's whatever the run's step backend
    _record("invert", run, n, time.perf_counter() - t0, backend="torch", convention=convention, refine=refine,
            model_calls_per_image=len(t_evals))
    return result


def _invert_batch(run: Run, x: torch.Tensor, start: int, points, refine: int, t_evals) -> torch.Tensor:
    """Encode one batch x (B, *shape) fp32 through the points; model calls through the run."""
    b, calls = x.shape[0], [0]
    kwargs = run.kwargs_for(start, b)
    guided = run.guided_kwargs(kwargs, run.uncond_for(start, b), b)
    run.flags.reset()

    def model_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = xt if run.dtype == torch.float32 else xt.to(run.dtype)
        k = calls[0]
        out, out_uncond = run.model_outputs(xin, t[0], k, t_evals[k], kwargs, guided)
        calls[0] += 1
        if out_uncond is None:
            return out
        g = run.guidance  # the encoder's arithmetic is the reference's: the combine op for op too
        return guide(out_uncond, out, g.weights[k], g.rescale)

    x = reference.invert_along(model_fn, x, points, run.plan, refine)
    j = run.flags.first_bad()
    if j is not None:
        unit = "step" if refine == 0 else "model call"
        raise FloatingPointError(
            f"model output is not finite (NaN or inf) at {unit} {j} (t={t_evals[j]}) of the inversion of the "
            f"batch starting at {start}"
        )
    return x


# ------------------------------------------------------------------------------ interpolate
def slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two latents (paper Figure 6).

    z0, z1: (*shape); alphas: (num,) in [0, 1]. Returns (num, *shape); rows for alpha 0 and 1
    are exactly z0 and z1.
    """
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    al = alphas.double().view(-1, 1)
    if float(theta) < 1e-6:  # parallel latents: slerp degenerates to lerp
        out = (1 - al) * a + al * b
    else:
        out = (torch.sin((1 - al) * theta) * a + torch.sin(al * theta) * b) / torch.sin(theta)
    out = out.float().reshape(len(alphas), *z0.shape)
    out[alphas == 0] = z0.float()
    out[alphas == 1] = z1.float()
    return out


def interpolate(model: Callable, z0: torch.Tensor, z1: torch.Tensor, num: int = 11, steps: int = 50, **sample_kwargs) -> torch.Tensor:
    """Decode ``num`` latents spherically interpolated between z0 and z1 (paper Figure 6).

    z0, z1: (*shape) or (1, *shape) latents (x_T). Returns (num, *shape): the samples at
    alpha = 0, 1/(num-1), ..., 1. The first and last rows equal ``sample`` of z0 and z1.
    Other keyword arguments go to ``sample`` (eta must stay 0 for a meaningful path).
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor):
        raise TypeError("z0 and z1 must be tensors")
    shape = resolve_shape(model, sample_kwargs.get("shape"), z0[None])
    z0 = z0.reshape(shape) if z0.shape in (shape, (1, *shape)) else z0
    z1 = z1.reshape(shape) if z1.shape in (shape, (1, *shape)) else z1
    if z0.shape != shape or z1.shape != shape:
        raise ValueError(f"z0 and z1 must have shape {shape} (or (1, *shape)), got {tuple(z0.shape)} and {tuple(z1.shape)}")
    num = check_int("num", num, 2)
    if "x_T" in sample_kwargs or "n" in sample_kwargs:
        raise TypeError("interpolate makes x_T and n itself")
    zs = slerp(z0.detach().cpu(), z1.detach().cpu(), torch.linspace(0, 1, num))
    return sample(model, n=num, steps=steps, x_T=zs, **sample_kwargs)
