"""train.py, killed from outside its code: SIGKILL (as from the OOM killer or a lost node) on the
last rank as it starts step $KILL_AT_STEP (counting from 0), once ($KILL_MARKER records it, so a
torchrun restart runs through). With a checkpoint every 2 steps and KILL_AT_STEP=3, step 2 is
trained and lost. tests/test_train.py runs it like train.py."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

train_step = train.train_step


def die_at_step(model, ddp, batch, optimizer, scaler, autocast, bad, step, args):
    rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    marker = os.environ["KILL_MARKER"]
    if step == int(os.environ["KILL_AT_STEP"]) and rank == world - 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(model, ddp, batch, optimizer, scaler, autocast, bad, step, args)


train.train_step = die_at_step
if __name__ == "__main__":
    train.main()
