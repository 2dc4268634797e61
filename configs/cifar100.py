"""CIFAR-100 class-incremental learning with the paper's settings (docs/algorithm.md §1-2, 6).

    python -m abd_jax.main --config=configs/cifar100.py --workdir=runs/c100 \
        --config.num_tasks=5 --config.method=lwf
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "cifar100"
    c.data_dir = ""            # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    c.image_size = 0           # folder:<root> datasets: resize to N x N (0 = keep; all equal)
    c.download = True          # let TFDS download when the dataset is not prepared
    c.train_per_class = 0      # keep only the first N training images per class (0 = all)
    c.input_pipeline = "auto"  # "device" (whole split on device), "stream" (grain, host reads),
    #                            "auto": stream for variable-size or large data
    c.stream_above_gb = 4.0    # "auto" streams a training split with more pixel bytes than this
    c.stream_workers = 0       # grain worker processes reading batches (0 = threads here)
    c.stream_prefetch = 4      # batches read ahead
    c.augment = ml_collections.ConfigDict(  # "abd": the release's recipe; "pycil": crop, flip,
        #                                        ColorJitter(brightness) and AutoAugment's
        #                                        CIFAR10Policy, as FeCAM, ADC, LDC (no contrast)
        dict(brightness=63 / 255, contrast=0.8, flip=True, crop_padding=4, policy="abd"))
    # Protocol.
    c.num_tasks = 10           # 5 / 10 / 20 tasks of 20 / 10 / 5 classes (the first included)
    c.first_task_classes = 0   # 0: equal tasks (cold start); B > 0: a first task of B classes,
    #                            then num_tasks - 1 equal steps (warm start: the field's
    #                            "B50, 5 steps" is first_task_classes=50, num_tasks=6)
    c.class_order = "release"  # the release's order for repeat r: Python's random.shuffle with
    #                            seed + r (ImageNet: numpy's seed 1993, every repeat); "1993"
    #                            (iCaRL / PODNet / PyCIL), "shuffle" (numpy's, by seed),
    #                            "identity", or "3,17,42,..." explicit
    c.num_classes = 0          # use only the first N classes of the class order (0 = all)
    c.seed = 0                 # repeat r uses seed + r (its own class order)
    c.repeats = 1
    c.first_repeat = 0         # this run's repeats are first_repeat .. + repeats - 1 (a slice
    #                            of a larger run: run_table.py --parallel runs each repeat alone)
    c.method = "abd"           # abd | deepinversion | lwf_synthetic | base | upper_bound |
    #                            lwf | lwf_mc | naive_rehearsal | lwf_coreset | e2e | bic |
    #                            dgr | rdfcil
    c.upper_bound_results = ""  # results.json of an upper_bound run, for Omega
    # Model.
    c.model = "resnet32"       # resnet<6n+2>, resnet<6n+2>_cl_lite (R-DFCIL's), resnet18,
    #                            resnet18_cifar (the exemplar-free papers': 3x3 stem, no pool)
    c.head = "linear"          # the classifier's head: "linear" (Dense) or "cosine" (sigma times
    #                            the cosine of features and class weights, a learnable sigma)
    c.dtype = "float32"        # compute dtype ("bfloat16" on GPU/TPU for speed)
    c.conv_impl = "auto"       # "xla", "im2col" (kernel gradient as matrix products), or
    #                            "auto": im2col on CPU (~17% faster steps there), xla elsewhere
    # Optimisation (per task; the optimiser is reset at every task).
    c.batch_size = 128
    c.epochs = 250
    c.lr = 0.1
    c.lr_milestones = (100, 150, 200)
    c.lr_decay = 0.1
    c.momentum = 0.9
    c.weight_decay = 2e-4
    # Losses (one subtree per method family).
    c.kd_temperature = 2.0     # T of every logit KD (docs/algorithm.md §6)
    c.lwf = ml_collections.ConfigDict(dict(mu=1.0))            # lwf, lwf_coreset
    c.lwf_synthetic = ml_collections.ConfigDict(dict(mu=0.1))
    c.deepinversion = ml_collections.ConfigDict(dict(mu=1.0))
    # ABD learner (docs/algorithm.md §5); the switches are the Table 3 ablations.
    c.abd = ml_collections.ConfigDict(dict(
        mu=0.1, task_balancing=True, local_ce=True, kd_on_real=True, kd_on_synthetic=True,
        ft_ce=True,
        ft_second_bn_update=False))  # True: BN running statistics move twice per step, as
    #                                  in the release (its FT-CE features come from a second,
    #                                  no-grad train-mode forward); False: one forward (paper)
    # Coreset baselines (docs/algorithm.md §6b, as the release runs them; docs/methods.md lists
    # every choice): a class-balanced memory of real training images.
    c.coreset = ml_collections.ConfigDict(dict(
        memory=2000,             # images kept (naive_rehearsal, lwf_coreset, e2e, bic)
        distinct_memory=False))  # naive_rehearsal, lwf_coreset: False redraws each class's
    #                              memory from the task's 1:1 resampled training set (release:
    #                              old classes keep duplicates); True keeps distinct images
    c.e2e = ml_collections.ConfigDict(dict(
        kd_weighting="mean",     # each past task's KD x |task| / K_old (release); "sum" (paper)
        selection="closest_to_mean",  # memory by distance to the class mean (release);
        #                          "herding" (paper), "herding_raw", "random"
        balanced_trains="head",  # balanced fine-tuning trains the head (release) or "all"
        balanced_epochs=0,       # 0 = the task's epochs and lr schedule (release); N = N
        #                          epochs at a constant rate (the paper: 30, all layers)
        balanced_lr_scale=0.01,  # at lr * 0.01
        balanced_bn="train",     # the head-only stage's backbone BatchNorm: "train" (release:
        #                          batch statistics, running statistics move) or "eval"
        new_class_kd="release"))  # the stage's new-class KD target: "release" (the previous
    #                              model's first logits, as its update_model_b) or "before"
    #                              (the model before the stage, the E2E paper)
    c.bic = ml_collections.ConfigDict(dict(
        val_fraction=0.1,        # held out: int(val_fraction * memory / K_old) per class
        selection="herding_raw",  # herding on raw features (release); "herding" (paper)
        stage2_epochs=0,         # 0 = the task's epochs and lr schedule (release)
        stage2_lr_scale=0.01,    # stage 2: SGD on (alpha, beta) at lr * 0.01
        stage2_bn="train",       # stage 2's backbone BatchNorm: "train" (release) or "eval"
        correct_at_test=False))  # False: evaluate the bare model, as the release (and the
    #                              paper's BiC row); True: with the corrections (BiC paper)
    # DGR (docs/algorithm.md §6b): the release's variational autoencoder, trained on each task's
    # batches with the solver's SGD and schedule.
    c.dgr = ml_collections.ConfigDict(dict(
        z_dim=1024,              # the release's CIFAR latent size
        mu=1.0,                  # KD on the replayed images (release); 0 = the DGR paper's
        weight_decay=0.0,        # the release's DGR script (solver and autoencoder)
        normalize_inputs=False))  # False: images in [0, 1], as the release's DGR
    # R-DFCIL (Gao et al. 2022; docs/methods.md): its loss scales, its head, the head fine-tuning
    # that ends every task after the first (the release: the last 40 of 200 epochs at 0.005).
    # configs/cifar100_rdfcil.py has the rest of its paper's setting.
    c.rdfcil = ml_collections.ConfigDict(dict(
        lambda_ce=0.5, lambda_hkd=0.15, lambda_rkd=0.5,
        finetune_epochs=40,      # 0 = no fine-tuning
        finetune_lr_scale=0.05,  # at lr * 0.05
        head="per_task"))        # the release's: a bias-free Linear per task, N(0, 0.001^2);
    #                              "shared": the model's own head (Kaiming, with a bias)
    # The exemplar-free methods whose backbone trains on the first task only (ncm, fecam,
    # fetril; docs/algorithm.md §11): that task's recipe, the official code's (FeCAM's and the
    # PyCIL ports'); their table rows use resnet18_cifar, the cosine head and augment "pycil".
    c.first_task_from = ""     # a run's workdir whose finished first task this run starts from
    #                            (the same first task: abd_jax/first_task.py checks)
    c.first_task = ml_collections.ConfigDict(dict(
        epochs=200, lr=0.1, weight_decay=5e-4,
        schedule="cosine",       # "cosine" (annealed to 0 over the epochs) or "steps"
        milestones=()))          # lr x lr_decay after these epochs ("steps")
    c.fecam = ml_collections.ConfigDict(dict(
        beta=0.5,                # Tukey's exponent (0 = log)
        alpha1=1.0, alpha2=1.0,  # covariance shrinkage of the diagonal, the off-diagonal
        shrinks=2,               # times shrunk (the official code: twice)
        normalize=True,          # covariance -> correlation
        shared_covariance=False))  # True: one covariance for every class (its Table 1 row)
    c.fetril = ml_collections.ConfigDict(dict(
        similarity="euclidean",  # the new class nearest to a past one: "euclidean" (official)
        #                          or "cosine" (PyCIL's port)
        classifier="linear",     # "linear": PyCIL's head on features; "svm": the official
        #                          LinearSVC (scikit-learn, on the host)
        epochs=50, lr=0.05, weight_decay=5e-4,  # the linear head (cosine schedule)
        svm_c=1.0, svm_tol=1e-4))
    # LwF + NCM and its drift corrections (docs/algorithm.md §13; ADC's and LDC's code): the
    # later tasks' SGD (the first task's: `first_task`), the KD, the drift of the old means.
    c.lwf_ncm = ml_collections.ConfigDict(dict(
        lam=10.0, temperature=2.0,     # lambda KD(T) beside the new classes' local CE
        epochs=100, lr=0.05, milestones=(45, 90), weight_decay=2e-4,
        drift="none",                  # "none", "sdc", "adc" or "ldc"
        sigma=0.3,                     # SDC's kernel width
        adc_alpha=25.0, adc_steps=3, adc_samples=100,  # ADC's step, steps, images per class
        ldc_epochs=20, ldc_lr=1e-3, ldc_batch_size=128))  # LDC's Adam fit of the linear map
    # ACIL and DS-AL (docs/algorithm.md §12): analytic learning on the frozen backbone.
    c.analytic = ml_collections.ConfigDict(dict(
        expansion=8192,          # E, the random expansion's width: R is E x E float64
        #                          (8192: 512 MB per stream; DS-AL has two)
        gamma=0.1, gamma_comp=0.1,  # the ridges (the official scripts'; DS-AL's second stream)
        batch_size=4096,         # images per recursive update (the code's IL batch size)
        compensation=0.6,        # DS-AL's C (the README's CIFAR-100 value; 1.5 on ImageNet)
        compute="host"))         # "host": NumPy float64; "device": jitted under x64
    # Model inversion (docs/algorithm.md §3), shared by abd, deepinversion, lwf_synthetic and
    # rdfcil (which inverts a new generator after every task).
    c.synthesis = ml_collections.ConfigDict(dict(
        iterations=10_000, batch_size=0,  # 0 = the learner's batch_size
        lr=1e-3, z_dim=1000, content_temperature=1e3, w_content=1.0, w_diversity=1.0,
        w_stat=50.0, w_smooth=1e-3, inner_bn_eps=0.8,
        generator_dtype="",    # G's compute dtype; "" = dtype (the teacher is always inverted
        #                        in float32; G's parameters and Adam state stay float32)
        log_every=500,
        checkpoint_every=2000,  # generator iterations between checkpoints
        sample_grid_size=64))   # synthetic samples drawn into samples_task<t>.png
    # Execution.
    c.num_devices = 0          # data-parallel over this many local devices (0 = all)
    c.eval_batch_size = 1000
    c.log_every_steps = 100
    c.tensorboard = True       # also write the logged scalars to <workdir>/tensorboard
    c.steps_per_call = 0       # steps fused into one jitted call (0 = auto: 1 on CPU, 50 else)
    c.compile_ahead = False    # compile evaluation, the generator step and later tasks' chunks
    #                            in background threads during task 1 (for GPU/TPU hosts with
    #                            idle CPU cores; abd_jax/ahead.py)
    c.checkpoint_every_steps = 2000
    c.keep_task_checkpoints = False  # keep each finished task's checkpoint (analyze)
    return c
