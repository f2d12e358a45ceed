"""train.py, killed from outside its code: SIGKILL (as from the OOM killer or a lost node) right
after the checkpoint of step $KILL_AFTER_STEP, on the last rank, once ($KILL_MARKER records it,
so a torchrun restart runs through). tests/test_train.py runs it like train.py."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

save_checkpoint = train.save_checkpoint


def save_then_die(path, state, rank=0, world=1):
    save_checkpoint(path, state, rank, world)
    marker = os.environ["KILL_MARKER"]
    if (state["step"] == int(os.environ["KILL_AFTER_STEP"]) and rank == world - 1
            and not os.path.exists(marker)):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


train.save_checkpoint = save_then_die
if __name__ == "__main__":
    train.main()
