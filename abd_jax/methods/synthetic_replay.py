"""The synthetic-replay family (ABD, DeepInversion, LwF + synthetic data): after each task the
frozen model is inverted into a generator (SPEC section 3), which every later step samples
(section 4). Members differ only in their loss."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from flax import struct

from abd_jax import models, synthesis, train
from abd_jax.methods.lifecycle import Runtime, Task, TeacherMethod


@struct.dataclass
class ReplayState:
    """teacher: the model frozen at the end of the previous task. generator: G's parameters,
    BatchNorm statistics and Adam state (one generator, trained on across tasks)."""

    teacher: train.Teacher
    generator: train.TrainState

    @property
    def generator_variables(self) -> dict:
        return {"params": self.generator.params, "batch_stats": self.generator.batch_stats}


def replay(ctx: train.LossContext, generator: nn.Module, z_dim: int) -> synthesis.Replay:
    """The step's real batch plus B synthetic images labelled by the teacher (section 4)."""
    state: ReplayState = ctx.method_state
    return synthesis.replay_batch(ctx, state.teacher, generator, state.generator_variables,
                                  z_dim)


def synthesis_config(config) -> synthesis.SynthesisConfig:
    fields = config.synthesis.to_dict()
    fields["batch_size"] = fields["batch_size"] or config.batch_size
    fields["generator_dtype"] = fields["generator_dtype"] or config.dtype
    return synthesis.SynthesisConfig(**fields)


class SyntheticReplay(TeacherMethod):
    """Task 1 with plain CE; after every task but the last, the generator is trained against
    the new teacher and a labelled sample grid is saved; later tasks use `distill_loss`, which
    reads the teacher and the generator from `ctx.method_state`."""

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.config = config
        self.synthesis = synthesis_config(config)
        height, _, channels = spec.image_shape
        self.generator = models.create_generator(height, channels, self.synthesis.z_dim,
                                                 self.synthesis.inner_bn_eps,
                                                 self.synthesis.generator_dtype)
        self._synthesizer: Optional[synthesis.Synthesizer] = None

    def synthesizer(self, rt: Runtime) -> synthesis.Synthesizer:
        if self._synthesizer is None:
            self._synthesizer = synthesis.Synthesizer(self.synthesis, self.generator, rt.model,
                                                      rt.mesh, rt.steps_per_call)
        return self._synthesizer

    def init_state(self, rt: Runtime, learner) -> ReplayState:
        generator = self.synthesizer(rt).init(jax.random.fold_in(rt.method_key, 0))
        return ReplayState(teacher=train.teacher_of(learner), generator=generator)

    def programs(self, rt: Runtime, learner, state: ReplayState) -> list:
        """The generator's fused step, as `end_task` calls it (`Synthesizer.train`)."""
        fn, args = self.synthesizer(rt).step_program(
            state.generator, train.teacher_of(learner), jax.random.fold_in(rt.method_key, 1))
        return [("generator step", fn, args)]

    def memory_footprint(self, rt: Runtime, state: ReplayState) -> dict:
        count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.generator.params))
        return {**super().memory_footprint(rt, state), "generator_parameters": count}

    def end_task(self, rt: Runtime, learner, state: ReplayState, task: Task):
        teacher = train.teacher_of(learner)
        if task.is_last:
            return learner, state.replace(teacher=teacher)
        synth = self.synthesizer(rt)
        log = lambda it, terms: rt.log(it, terms, task=task.index + 1, phase="generator")
        # G trains after every task but the last: after task t it has taken
        # (t + 1) * iterations steps, also when resumed from a checkpoint taken part-way.
        save = lambda generator, it: rt.checkpoint_progress(
            task, learner, state.replace(generator=generator), it)
        generator = synth.train(state.generator, teacher, task.num_seen,
                                jax.random.fold_in(rt.method_key, task.index + 1), log=log,
                                log_every=self.config.synthesis_log_every,
                                until=(task.index + 1) * self.synthesis.iterations,
                                checkpoint=save,
                                checkpoint_every=self.config.synthesis_checkpoint_every)
        images, predicted = synth.labelled_samples(
            generator, teacher, task.num_seen, jax.random.fold_in(rt.method_key, 1000 + task.index),
            self.config.sample_grid_size)
        rt.save_samples(task.index, images, predicted,
                        f"synthetic samples after task {task.index + 1} "
                        "(teacher's predicted class, original class id)")
        return learner, ReplayState(teacher=teacher, generator=generator)
