//! Raising this process's open-files limit (RLIMIT_NOFILE) so a benchmark can hold as
//! many connections as asked for.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Makes sure at least `wanted` descriptors may be open: raises the soft limit, and the
/// hard limit too when that is allowed (root). Returns the soft limit now in force.
pub fn raise_nofile(wanted: u64) -> Result<u64, String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("reading the open-files limit: {e}"))?;
    if soft >= wanted {
        return Ok(soft);
    }
    if hard < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    let new_soft = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new_soft, hard)
        .map_err(|e| format!("raising the open-files limit to {new_soft}: {e}"))?;
    Ok(new_soft)
}
