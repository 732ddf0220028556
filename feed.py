"""The training feed: the batches of every epoch of a run, from one sampler over all its epochs, so
that the next epoch's first batches are prepared while the current epoch's last ones train (a
DataLoader re-iterated per epoch drains its workers at every epoch's end).

Two paths, the same images, labels and pixels (tests/test_feed.py):
  host    the uint8 images stay in host memory; DataLoader workers (or this process) pick each batch's
          images and augment them (data.PaperAugment); the uint8 batch crosses to the device.
  device  the uint8 cache is copied to the device once; workers make only each batch's draws (a plan,
          augment.draw_plan), and a thread picks the images on the device and applies the plan there
          (augment.apply_plan), on a side CUDA stream, a few batches ahead of the training step.
devices.data_path chooses between them (train.py --data_path).
"""
import queue
import threading

import torch

import augment
import data

PREFETCH = 3            # batches the device path keeps ready ahead of the step, at least
CHUNK_IMAGES = 256      # the device path augments consecutive batches together up to this many images: a
                        # batch of 64 costs as many kernel launches as one of 256 (docs/performance.md)


class RunBatches(torch.utils.data.Sampler):
    """data.EpochBatches of epochs start..end, one after the other: one sampler for the whole run."""

    def __init__(self, batches, start, end):
        self.batches, self.start, self.end = batches, start, end

    def __len__(self):
        return len(self.batches) * (self.end - self.start + 1)

    def __iter__(self):
        for epoch in range(self.start, self.end + 1):
            yield from self.batches.batches_of(epoch)


class Draws(torch.utils.data.Dataset):
    """A batch of keys (image index, draw seed) -> its plan (augment.draw_plan), no pixels: what the
    device path's DataLoader workers make."""

    def __init__(self, labels, size, transform):
        self.labels, self.transform = labels, transform
        self.variants = augment.Variants(transform, size, size) if transform is not None else None

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, keys):
        if self.transform is None:
            return {"index": torch.tensor([i for i, _ in keys]), "label": torch.tensor([self.labels[i] for i, _ in keys])}
        return augment.draw_plan(self.transform, self.variants, keys, self.labels)


class Feed:
    """epoch(e) -> that epoch's batches, (uint8 images (B, 3, S, S), labels (B,)), for epochs start..end
    in order. Host path: on the host (pinned on CUDA). Device path: on the device, ready for the
    current stream. close() stops the workers and the thread."""

    def __init__(self, dataset, batches, start, end, device, path, workers, mp_context=None):
        self.batches, self.device, self.path, self.steps = batches, torch.device(device), path, len(batches)
        cuda = self.device.type == "cuda"
        source = dataset if path == "host" else Draws(dataset.labels, dataset.size, dataset.transform)
        self.loader = torch.utils.data.DataLoader(source, batch_sampler=RunBatches(batches, start, end),
                                                  num_workers=workers, pin_memory=cuda,
                                                  collate_fn=None if path == "host" else data._as_list,
                                                  prefetch_factor=4 if workers else None,
                                                  multiprocessing_context=mp_context if workers else None)
        self.it = iter(self.loader)
        self.thread = None
        if path == "device":
            applier = None
            if dataset.transform is not None:
                applier = augment.Applier(dataset.transform, self.device)
                applier.variants(dataset.size, dataset.size)      # its constants reach the device now
            self.thread = DevicePrefetch(self.it, dataset.images.to(self.device), applier, self.device,
                                         max(1, CHUNK_IMAGES // batches.batch_size))

    def epoch(self, epoch):
        return Epoch(self)

    def next(self):
        if self.thread is not None:
            return self.thread.get()
        return next(self.it)

    def close(self):
        if self.thread is not None:
            self.thread.stop()
        self.it = None          # shuts the workers down


class Epoch:
    """One epoch's batches of a Feed: len() steps."""

    def __init__(self, feed):
        self.feed = feed

    def __len__(self):
        return self.feed.steps

    def __iter__(self):
        for _ in range(self.feed.steps):
            yield self.feed.next()


class DevicePrefetch(threading.Thread):
    """Takes plans from the loader, picks their images from the device's cache and applies them, on its
    own CUDA stream, at least PREFETCH batches ahead, `chunk` consecutive batches at a time (one
    application for all of them, then split); get() hands the next batch to the current stream without
    a host sync (the current stream waits for the batch's event)."""

    def __init__(self, plans, cache, applier, device, chunk=1):
        super().__init__(daemon=True)
        self.plans, self.cache, self.applier, self.device, self.chunk = plans, cache, applier, device, chunk
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(device))   # the cache's upload
        self.ready, self.stopping = queue.Queue(maxsize=max(PREFETCH, 2 * chunk)), threading.Event()
        self.start()

    def prepare(self, plan):
        """A plan (CPU tensors, pinned on CUDA) -> (uint8 images (n, 3, S, S), labels (n,)) on the device."""
        bounds = plan.pop("bounds").tolist() if "bounds" in plan else None
        p = {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}
        x = self.cache.index_select(0, p["index"])                       # (n, 3, S, S) uint8
        if self.applier is not None:
            x = self.applier(x, p, bounds)
        return x, p["label"]

    def prepare_chunk(self, plans):
        """Consecutive batches' plans -> their batches, prepared together."""
        sizes = [len(p["index"]) for p in plans]
        variants = self.applier.variants(*self.cache.shape[-2:]) if self.applier is not None else None
        x, y = self.prepare(augment.merge_plans(plans, variants))
        return list(zip(x.split(sizes), y.split(sizes)))

    def run(self):
        try:
            plans = iter(self.plans)
            while not self.stopping.is_set():
                chunk = [p for _, p in zip(range(self.chunk), plans)]
                if not chunk:
                    return
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        batches = self.prepare_chunk(chunk)
                        done = torch.cuda.Event()
                        done.record(self.stream)
                else:
                    batches, done = self.prepare_chunk(chunk), None
                for batch in batches:
                    self.put((batch, done, None))
        except BaseException as e:          # handed to the training loop, which raises it
            self.put((None, None, e))

    def put(self, item):
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        batch, done, error = self.ready.get()
        if error is not None:
            raise error
        x, y = batch
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            x.record_stream(current)       # their memory is not reused before the step is done with them
            y.record_stream(current)
        return x, y

    def stop(self):
        self.stopping.set()
        try:
            while True:
                self.ready.get_nowait()
        except queue.Empty:
            pass
        self.join(timeout=10)
        self.plans = None
