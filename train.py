"""
Train a small GPT and publish its token embeddings to the analysis daemon at every eval.

    python train.py                                     # built-in synthetic corpus with planted groups
    python train.py --dataset=text --text_path=input.txt
    python train.py --dataset=bin --data_dir=data/mydata  # train.bin / val.bin (uint16) + meta.json
    python train.py --init_from=resume --max_iters=1000   # continue out/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py     # DDP: rank 0 evaluates, logs and publishes
    python train.py --help                                # every option with its default

--analysis=none trains without the daemon; with it on, a missing daemon never slows training.
"""
import math
import netrc
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, configure
from corpus import CorpusError, load_bin, load_text, synthetic_corpus
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# default config values: the synthetic corpus and a model sized so that a CPU run learns the planted
# groups in seconds (about 300 steps of ~10-20 ms on 2 cores; the 500 steps take ~15 s); --help lists them all
# I/O
out_dir = 'out' # checkpoints go to out_dir/ckpt.pt
run_name = '' # names the run for the daemon and wandb; '' -> f"{dataset}-{timestamp}" (on resume: the checkpoint's)
eval_interval = 50 # evaluate, checkpoint and publish the embeddings every this many iterations (and at the last one)
log_interval = 10 # print the training loss every this many iterations
eval_iters = 20 # batches per split in estimate_loss: 20 x 32 x 32 tokens is enough for a stable loss here
eval_only = False # if True, evaluate (and publish) once and exit
always_save_checkpoint = True # if False, only save when the val loss improved
keep_checkpoints = False # also keep every checkpoint as out_dir/checkpoints/ckpt_{iter:06d}.pt (analysis-daemon replay reads them)
init_from = 'scratch' # 'scratch' or 'resume' (from out_dir/ckpt.pt, iteration count included)
# wandb logging
wandb_log = True # log train/loss, eval/loss, train/learning_rate; offline unless set up (WANDB_MODE, WANDB_API_KEY, ~/.netrc)
wandb_project = 'embedding-monitor' # the daemon logs its analysis run into the same project and group
wandb_run_name = '' # '' -> run_name
# embedding analysis
analysis = 'zmq' # 'zmq': publish wte to the analysis daemon at every eval; 'none': no hook at all
analysis_endpoint = '' # where the daemon listens (its --listen); '' = the private same-host default (an ipc socket in a 0700 dir)
analysis_send_dtype = 'float32' # 'float16' or 'bfloat16' halve the bytes per snapshot, at some precision
analysis_curve_client_secret = '' # CurveZMQ (daemon on another host): this trainer's NAME.key_secret file
analysis_curve_server_public = '' # CurveZMQ: the daemon's public NAME.key file; both '' = no encryption
analysis_allow_insecure = False # send unencrypted to a non-loopback endpoint (trusted networks only)
# data
dataset = 'synthetic' # 'synthetic' (planted groups, no files), 'text' (text_path) or 'bin' (data_dir)
text_path = '' # dataset='text': a UTF-8 file, modelled character by character, 90/10 train/val split
data_dir = '' # dataset='bin': directory with train.bin, val.bin (uint16 token ids) and meta.json
vocab_size = 0 # dataset='bin': vocabulary size when meta.json does not give it (0 = from meta.json)
synthetic_tokens = 200_000 # size of the synthetic corpus (10% is validation); generated in ~0.2 s
synthetic_groups = 16 # planted topic groups: the galaxies the embeddings should form
synthetic_group_size = 8 # interchangeable tokens per group: vocabulary = 10 function words + groups x size
synthetic_seed = 0 # same seed, same corpus (independent of the training seed)
gradient_accumulation_steps = 1 # micro-batches per optimizer step, in total over all DDP ranks
batch_size = 32 # sequences per micro-batch
block_size = 32 # context length; synthetic sentences are ~8 tokens, so a block spans several
# model
n_layer = 2 # transformer blocks; 2 is plenty for a first-order grammar and keeps a CPU step ~15 ms
n_head = 4 # attention heads
n_embd = 64 # embedding width: the d of the V x d matrix the daemon analyses
dropout = 0.0 # no overfitting to fight on a generated corpus
bias = False # biases in Linear and LayerNorm layers
# adamw optimizer
learning_rate = 3e-3 # peak learning rate; a model this small trains well this high
max_iters = 500 # optimizer steps in total; the groups are clearly formed well before the end
weight_decay = 0.1 # applied to matrices only (embeddings included), never to gains or biases
beta1 = 0.9 # AdamW momentum
beta2 = 0.99 # below the usual 0.999 because small batches make gradients noisy
grad_clip = 1.0 # clip the gradient norm at this value, 0 to disable
# learning rate schedule
decay_lr = True # cosine decay after a linear warm-up; False keeps learning_rate constant
warmup_iters = 30 # linear warm-up steps
lr_decay_iters = 0 # cosine reaches min_lr here; 0 = at max_iters
min_lr = 3e-4 # final learning rate, about learning_rate / 10
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu' # 'cpu', 'cuda', 'cuda:1', 'mps'...
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32' # CUDA autocast: float32, bfloat16, float16
compile = False # torch.compile the model: faster steps on GPU after a slow first one
backend = 'nccl' if torch.cuda.is_available() else 'gloo' # DDP backend: 'nccl' for GPUs, 'gloo' for CPU
seed = 1337 # training seed (weights init and batch sampling); each DDP rank adds its rank
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
try:
    overrides = configure({k: globals()[k] for k in config_keys}, sys.argv[1:], source_path=__file__)
except ConfigError as e:
    sys.exit(f"Error: {e}")
globals().update(overrides)
for key, allowed in [('dataset', ('synthetic', 'text', 'bin')), ('init_from', ('scratch', 'resume')),
                     ('analysis', ('zmq', 'none')), ('dtype', ('float32', 'bfloat16', 'float16')),
                     ('analysis_send_dtype', ('float32', 'bfloat16', 'float16'))]:
    if globals()[key] not in allowed:
        sys.exit(f"Error: --{key} must be one of {', '.join(allowed)} (got {globals()[key]!r})")
for key in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size', 'block_size',
            'n_layer', 'n_head', 'n_embd'):
    if globals()[key] < 1:
        sys.exit(f"Error: --{key} must be at least 1 (got {globals()[key]})")
if n_embd % n_head:
    sys.exit(f"Error: --n_embd={n_embd} must be a multiple of --n_head={n_head}")
config = {k: globals()[k] for k in config_keys} # plain values: logged to wandb and stored in the checkpoint
# -----------------------------------------------------------------------------

# distributed setup: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    init_process_group(backend=backend)
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0 # this process evaluates, checkpoints, logs and publishes
    seed_offset = ddp_rank # different batches per rank (DDP copies rank 0's initial weights to all)
    # the world size shares the accumulation steps; each rank does at least one micro-batch
    gradient_accumulation_steps = max(1, gradient_accumulation_steps // ddp_world_size)
else:
    master_process = True
    seed_offset = 0
    ddp_world_size = 1
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    if overrides:
        print("config overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    print(f"tokens per iteration: {tokens_per_iter:,}")
    os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed + seed_offset)
# TF32 matmuls on Ampere and newer: much faster, and the precision lost does not matter for training
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
# autocast only on CUDA: bf16 on CPU is slower than fp32 for a model this small
ctx = nullcontext() if device_type == 'cpu' or dtype == 'float32' else torch.amp.autocast(device_type, dtype=ptdtype)

# data: every source becomes two 1-D arrays of token ids, plus token strings when they are known
try:
    if dataset == 'synthetic':
        corpus = synthetic_corpus(synthetic_tokens, synthetic_groups, synthetic_group_size, seed=synthetic_seed)
    elif dataset == 'text':
        corpus = load_text(text_path)
    else:
        corpus = load_bin(data_dir, vocab_size)
except CorpusError as e:
    sys.exit(f"Error: {e}")
if min(len(corpus.train), len(corpus.val)) <= block_size:
    sys.exit(f"Error: {dataset} data too short: {len(corpus.train)} train / {len(corpus.val)} val tokens, "
             f"each split needs more than block_size={block_size}; use more data or a smaller --block_size")
itos = corpus.itos # token strings, sent to the daemon so its reports name tokens instead of ids
if master_process:
    print(f"dataset {dataset}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens, "
          f"vocab_size {corpus.vocab_size}")

def get_batch(split):
    data = corpus.train if split == 'train' else corpus.val
    # one fancy-indexing gather of (batch_size, block_size + 1) tokens: inputs and shifted targets
    ix = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    rows = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if device_type == 'cuda':
        # page-locked host memory lets the copy to the GPU overlap with the work already queued
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y

# model and optimizer state: fresh, or whatever the checkpoint holds
iter_num = 0
best_val_loss = 1e9
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  bias=bias, vocab_size=corpus.vocab_size, dropout=dropout)
checkpoint = None
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        sys.exit(f"Error: no checkpoint at {ckpt_path}; train once with --init_from=scratch (or set --out_dir)")
    # weights_only: tensors and plain containers only, no arbitrary unpickling
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    if checkpoint['model_args']['vocab_size'] != corpus.vocab_size:
        sys.exit(f"Error: {ckpt_path} has vocab_size {checkpoint['model_args']['vocab_size']} but dataset "
                 f"{dataset} has {corpus.vocab_size}; resume with the data it was trained on")
    # the model's shape comes from the checkpoint, whatever the command line says
    for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size'):
        model_args[k] = checkpoint['model_args'][k]
    block_size = model_args['block_size']
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    run_name = run_name or checkpoint['run_name'] # same run for the daemon: drift continues from the last snapshot
    if master_process:
        print(f"resuming from {ckpt_path} at iteration {iter_num}")
run_name = run_name or f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
model = GPT(GPTConfig(**model_args))
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
model.to(device)
raw_model = model # the plain module: checkpoints and the hook use it, never the compiled/DDP wrapper
if master_process:
    print(f"model: {raw_model.num_params() / 1e3:.1f}k parameters, run {run_name}")

# float16 needs loss scaling so small gradients do not underflow; for bf16 and fp32 the scaler does nothing
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16' and device_type == 'cuda'))
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
checkpoint = None # the weights now live in the model and optimizer; drop the second copy

if compile:
    if master_process:
        print("compiling the model: the first steps will be slow")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

# mean loss over eval_iters random batches of each split: far less noisy than one training batch
@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out

# learning rate at iteration it: linear warm-up, then a half cosine from learning_rate down to min_lr
def get_lr(it):
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) # 1 at the end of warm-up, 0 at decay_iters
    return min_lr + coeff * (learning_rate - min_lr)

def wandb_configured():
    # the user set W&B up (a mode, a key or `wandb login`): then wandb decides online or offline
    if os.environ.get('WANDB_MODE') or os.environ.get('WANDB_API_KEY'):
        return True
    try:
        return netrc.netrc().authenticators('api.wandb.ai') is not None
    except (OSError, netrc.NetrcParseError):
        return False

# logging
wandb_info = None # tells the daemon where to log its analysis run: same project, same group
if wandb_log and master_process:
    import wandb
    wandb_mode = None if wandb_configured() else 'offline'
    if wandb_mode == 'offline':
        print("wandb: not configured (no WANDB_MODE, WANDB_API_KEY or login), logging offline; "
              "upload later with `wandb sync`")
    wandb_run = wandb.init(project=wandb_project, group=run_name, name=wandb_run_name or run_name,
                           config=config, mode=wandb_mode)
    if not wandb_run.disabled: # WANDB_MODE=disabled: nothing for the daemon to join
        wandb_info = {"project": wandb_project, "group": run_name, "run_id": wandb_run.id,
                      "run_name": wandb_run.name, "mode": "offline" if wandb_run.offline else "online"}

# the analysis hook: three lines in any training script (import, create, publish; close at the end)
publisher = None
if analysis == 'zmq' and master_process:
    from trainer_hook import EmbeddingPublisher # imported only when used: --analysis=none needs no zmq
    try: # never blocks and needs no daemon yet; it only refuses a bad endpoint or unreadable keys
        publisher = EmbeddingPublisher(analysis_endpoint or None, run=run_name, vocab=itos, wandb_info=wandb_info,
                                       send_dtype=getattr(torch, analysis_send_dtype),
                                       curve_client_secret=analysis_curve_client_secret or None,
                                       curve_server_public=analysis_curve_server_public or None,
                                       allow_insecure=analysis_allow_insecure)
    except (ValueError, OSError) as e:
        sys.exit(f"Error: analysis hook: {e} (or train without it: --analysis=none)")
    publisher.watch_tokens(raw_model.transformer.wte) # counts the ids of training forwards: drift by token frequency

# Ctrl-C or SIGTERM: finish this iteration, then stop as if max_iters were reached, so the last state is
# still evaluated, saved and handed to the daemon and everything closes cleanly; a second Ctrl-C aborts.
# Not under DDP: ranks would see the signal at different iterations and wait on each other forever;
# torchrun stops its workers itself.
stop_requested = False
def request_stop(signum, frame):
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)
if not ddp:
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

# training loop
X, Y = get_batch('train') # the loop always holds the next batch ready
t_start = t0 = time.time()
start_iter = iter_num
while True:

    # this iteration's learning rate, set on every parameter group
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # evaluate the loss on train/val sets, write checkpoints and publish the embeddings; the last
    # iteration is always evaluated, so the final state is logged, saved and analysed
    last_iter = iter_num >= max_iters or stop_requested
    if (iter_num % eval_interval == 0 or last_iter) and master_process:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        # one naming scheme for W&B, the daemon's records and replay (docs/training-metrics.md)
        metrics = {"train/loss": losses['train'], "eval/loss": losses['val'], "train/learning_rate": lr}
        if wandb_log:
            wandb.log(metrics, step=iter_num)
        if iter_num > 0 and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            checkpoint = {
                'model': raw_model.state_dict(),
                'optimizer': optimizer.state_dict(),
                'model_args': model_args,
                'iter_num': iter_num,
                'best_val_loss': best_val_loss,
                'metrics': metrics, # replay carries them, as the live daemon does
                'run_name': run_name,
                'itos': itos,
                'config': config,
            }
            print(f"saving checkpoint to {out_dir}")
            # write then rename: an interrupted save never leaves a truncated ckpt.pt behind
            torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt.tmp'))
            os.replace(os.path.join(out_dir, 'ckpt.pt.tmp'), os.path.join(out_dir, 'ckpt.pt'))
            if keep_checkpoints:
                kept = os.path.join(out_dir, 'checkpoints', f'ckpt_{iter_num:06d}.pt')
                os.makedirs(os.path.dirname(kept), exist_ok=True)
                torch.save(checkpoint, kept + '.tmp')
                os.replace(kept + '.tmp', kept)
            checkpoint = None
        if publisher is not None:
            # hands the snapshot off, returns at once; the losses travel with it (loss beside drift in W&B)
            publisher.publish(raw_model.transformer.wte, iter_num, metrics=metrics)
    if last_iter or eval_only:
        if stop_requested and master_process:
            print(f"stopped by signal at iteration {iter_num}")
        break

    # one optimizer step: gradient_accumulation_steps forward/backward passes summed into the gradients,
    # as if the batch were that many times larger
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            # all-reduce the gradients once, after the last micro-batch, not after each one
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps # the summed gradients then equal the mean over micro-batches
        # load the next batch now: on CUDA the forward pass above is still running asynchronously
        X, Y = get_batch('train')
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer) # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True) # set_to_none frees the gradient memory until the next backward

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        lossf = loss.item() * gradient_accumulation_steps # .item() waits for the GPU: only every log_interval
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms")
    iter_num += 1

if master_process:
    steps = iter_num - start_iter
    print(f"done: {steps} iterations in {time.time() - t_start:.1f}s "
          f"({(time.time() - t_start) * 1000 / max(1, steps):.1f} ms/iter, evals included)")
if publisher is not None:
    publisher.close() # sends `end`: the daemon analyses the last snapshot and closes the run
    print(f"analysis: {publisher.published} snapshots published, {publisher.dropped} dropped")
if wandb_log and master_process:
    wandb.finish()
if ddp:
    # Every rank leaves together: a rank that tears down its gloo group while rank 0 is still saving the
    # last checkpoint aborts ("terminate called without an active exception") and fails the whole job.
    torch.distributed.barrier()
    destroy_process_group()
