"""Redis key names. Keys touched together share a Cluster hash tag: `{job_id}` or `{client_id}`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key patterns of DESIGN.md under an optional deployment-wide namespace."""

    namespace: str = ""  # empty or ending in ":"
    job_prefix: str = "job"

    def job(self, job_id: int) -> str:
        """`job:{id}:progress`: the cached job object (JSON)."""
        return f"{self.namespace}{self.job_prefix}:{{{job_id}}}:progress"

    def lease(self, job_id: int) -> str:
        """The fill lease of a job entry (same hash tag as the entry)."""
        return f"{self.namespace}{self.job_prefix}:{{{job_id}}}:lease"

    def seal(self, job_id: int) -> str:
        """The seal (keyed MAC, `shared.cache.seal`) of the job entry (same hash tag)."""
        return f"{self.namespace}{self.job_prefix}:{{{job_id}}}:seal"

    def floor(self, job_id: int) -> str:
        """The job's version floor (a hash: incarnation, version, revocation count). It
        outlives the entry, so no fill installs a version older than one already seen."""
        return f"{self.namespace}{self.job_prefix}:{{{job_id}}}:floor"

    def channel(self, job_id: int) -> str:
        """Pub/sub channel carrying every new version of a job."""
        return f"{self.namespace}{self.job_prefix}:{{{job_id}}}:events"

    def jobs(self, client_id: str) -> str:
        """`jobs:{client_id}`: one hash holding every cached page of a client's job list."""
        return f"{self.namespace}jobs:{{{client_id}}}"

    def storyboard(self, job_id: int) -> str:
        return f"{self.namespace}storyboard:{{{job_id}}}"

    def stats(self) -> str:
        """The global statistics hash, shared by every process of the deployment."""
        return f"{self.namespace}cache:stats"

    def stats_batch(self, batch_id: str) -> str:
        """Marks a statistics batch as counted. Same Cluster slot as the stats hash: its
        hash tag is the stats key's whole name (which has no tag, so that is its slot)."""
        return f"{self.stats()}:{{{self.stats()}}}:batch:{batch_id}"
