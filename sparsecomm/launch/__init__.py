"""Where a job's processes come from and how they become one job: joining the process group and
choosing the device (:mod:`.job`), noticing a lost worker (:mod:`.watchdog`), and starting a
plain run's workers on this machine (:mod:`.local`, ``python -m sparsecomm.launch``).

The steps run.sh takes before the trainer (``python -m sparsecomm.train.start`` puts them in
order): who started the process (:mod:`.launcher`, SLURM's notations in :mod:`.slurm`), where
rank 0 listens (:mod:`.rendezvous`, this host's addresses and ports in :mod:`.host`), the network
interface for collectives (:mod:`.interface`), run.sh's variables as trainer options
(:mod:`.variables`), and the job's data (:mod:`.data`)."""
