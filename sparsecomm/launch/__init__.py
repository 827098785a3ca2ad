"""Where a job's processes come from and how they become one job: joining the process group and
choosing the device (:mod:`.job`), noticing a lost worker (:mod:`.watchdog`), and starting a
plain run's workers on this machine (:mod:`.local`, ``python -m sparsecomm.launch``)."""
