"""The synthetic-replay family (ABD, DeepInversion, LwF + synthetic data): after each task the
frozen model is inverted into a generator (docs/algorithm.md §3), which every later step samples
(section 4). Members differ only in their loss."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import struct

from abd_jax import driver, generators, models, rng, synthesis, train
from abd_jax.methods.lifecycle import Loop, Runtime, Update
from abd_jax.methods.teacher import FrozenModel, TeacherMethod, freeze
from abd_jax.plan import Task


@struct.dataclass
class ReplayState:
    """teacher: the model frozen at the end of the previous task. generator: G's parameters,
    BatchNorm statistics and Adam state (one generator, trained on across tasks)."""

    teacher: FrozenModel
    generator: train.TrainState

    @property
    def generator_variables(self) -> dict:
        return {"params": self.generator.params, "batch_stats": self.generator.batch_stats}


def replay(ctx: train.LossContext, generator: nn.Module, z_dim: int) -> synthesis.Replay:
    """The step's real batch plus B synthetic images labelled by the teacher (section 4)."""
    state: ReplayState = ctx.inputs
    return synthesis.replay_batch(ctx, state.teacher, generator, state.generator_variables,
                                  z_dim)


def synthesis_config(config) -> synthesis.SynthesisConfig:
    names = {f.name for f in dataclasses.fields(synthesis.SynthesisConfig)}
    fields = {k: v for k, v in config.synthesis.to_dict().items() if k in names}
    fields["batch_size"] = fields["batch_size"] or config.batch_size
    fields["generator_dtype"] = fields["generator_dtype"] or config.dtype
    return synthesis.SynthesisConfig(**fields)


@dataclasses.dataclass(frozen=True)
class Inversion(Loop):
    """The generator's training against the model just trained (docs/algorithm.md §3), after every
    task but the last. ABD's G keeps its weights and Adam state: after task t it has taken
    (t + 1) * iterations steps. With `fresh` (R-DFCIL) a newly initialised G takes
    `iterations` steps after every task."""

    method: "SyntheticReplay"
    fresh: bool = False
    name: str = "generator"
    setting: str = "synthesis.lr"

    def begin(self, rt, learner, state, task):
        if not self.fresh:
            return learner, state
        generator = self.method.synthesizer(rt).init(rng.fold_in(rt.method_key,
                                                                 50_000 + task.index))
        return learner, state.replace(generator=generator)

    def get(self, learner, state):
        return state.generator

    def put(self, learner, state, trained):
        return learner, state.replace(generator=trained)

    def program(self, rt, learner, state, task, start):
        synth, iterations = self.method.synthesizer(rt), self.method.synthesis.iterations
        until = iterations if self.fresh else (task.index + 1) * iterations
        args = synth.step_args(until, freeze(learner), task.num_seen,
                               rng.fold_in(rt.method_key, task.index + 1))
        return driver.DrivenLoop(f"task {task.index + 1} generator", synth.fused_step, args,
                                 start, iterations, rt.steps_per_call)

    def log_every(self, config):
        return config.synthesis.log_every

    def checkpoint_every(self, config):
        return config.synthesis.checkpoint_every


class SyntheticReplay(TeacherMethod):
    """Task 1 with plain CE; after every task but the last, the generator is trained against
    the new teacher and a labelled sample grid is saved; later tasks use `distill_loss`, which
    reads the teacher and the generator from `ctx.inputs`."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.synthesis = synthesis_config(config)
        height, _, channels = spec.image_shape
        self.generator = generators.create_generator(height, channels, self.synthesis.z_dim,
                                                 self.synthesis.inner_bn_eps,
                                                 self.synthesis.generator_dtype)

    def synthesizer(self, rt: Runtime) -> synthesis.Synthesizer:
        """The generator's programs (one per session for equal settings)."""
        return rt.session.shared(synthesis.Synthesizer, rt.session, self.synthesis,
                                 self.generator, rt.model, rt.mesh, rt.steps_per_call)

    def init_state(self, rt: Runtime, learner) -> ReplayState:
        generator = self.synthesizer(rt).init(rng.fold_in(rt.method_key, 0))
        return ReplayState(teacher=freeze(learner), generator=generator)

    def programs(self, rt: Runtime, learner, state: ReplayState) -> list:
        """The generator's fused step, as `Inversion` calls it."""
        synth = self.synthesizer(rt)
        args = synth.step_args(0, freeze(learner), 0, rng.fold_in(rt.method_key, 1))
        return [("generator step", synth.fused_step, (state.generator, *args))]

    def memory_footprint(self, rt: Runtime, state: ReplayState) -> dict:
        return {**super().memory_footprint(rt, state),
                "generator_parameters": models.parameter_count(state.generator.params)}

    def end_task(self, task: Task) -> list:
        if task.is_last:
            return super().end_task(task)
        return [Inversion(self), Update("samples and teacher", self.samples_and_teacher)]

    def samples_and_teacher(self, rt: Runtime, learner, state: ReplayState, task: Task):
        """A labelled grid of the new generator's images; the trained model as the teacher."""
        teacher = freeze(learner)
        images, predicted = self.synthesizer(rt).labelled_samples(
            state.generator, teacher, task.num_seen,
            rng.fold_in(rt.method_key, 1000 + task.index), self.config.synthesis.sample_grid_size)
        rt.services.save_samples(task.index, images, predicted,
                                 f"synthetic samples after task {task.index + 1} "
                                 "(teacher's predicted class, original class id)")
        return learner, state.replace(teacher=teacher)

