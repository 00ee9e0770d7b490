//! This machine's memory, for refusing work that cannot fit before it is allocated (an allocation past
//! physical memory aborts the process or drives it into swap, which no error message survives).

/// Physical memory (Linux: `MemTotal` of /proc/meminfo); `None` where it cannot be read.
pub fn physical_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
