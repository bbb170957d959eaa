//! Dropping privileges in workers.
//!
//! Owns resolving `--user`/`--group` (in the master, at start, so an unknown name is a
//! start-up error) and switching a worker to them after fork. The order is fixed:
//! supplementary groups, then the group, then the user — once the user is switched,
//! the process may no longer change its groups. The result is checked, because a
//! worker that kept root by mistake must not serve.

use nix::unistd::{
    Gid, Group, Uid, User, getegid, geteuid, getgid, getuid, setgid, setgroups, setuid,
};

/// Who the workers run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `--user` and `--group`; None when neither is given.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
    let user = match user {
        None => None,
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| format!("cannot look up user '{name}': {e}"))?
                .ok_or_else(|| format!("unknown user '{name}'"))?,
        ),
    };
    let gid = match group {
        Some(name) => Some(
            Group::from_name(name)
                .map_err(|e| format!("cannot look up group '{name}': {e}"))?
                .ok_or_else(|| format!("unknown group '{name}'"))?
                .gid,
        ),
        None => user.as_ref().map(|u| u.gid),
    };
    let identity = match (user, gid) {
        (Some(user), Some(gid)) => Identity { uid: user.uid, gid },
        (None, Some(gid)) => Identity { uid: getuid(), gid },
        _ => return Ok(None),
    };
    // Only root may switch: say so at start, rather than let every worker die of it.
    let switching = identity.uid != geteuid() || identity.gid != getegid();
    if switching && !geteuid().is_root() {
        return Err(format!(
            "--user/--group: switching to uid {} gid {} needs raasd to start as root",
            identity.uid, identity.gid
        ));
    }
    Ok(Some(identity))
}

impl Identity {
    /// Switches this process to the identity, and checks that it holds.
    pub fn assume(&self) -> Result<(), String> {
        let changing_user = self.uid != getuid();
        if changing_user || self.gid != getgid() {
            setgroups(&[self.gid]).map_err(|e| format!("setgroups: {e}"))?;
        }
        setgid(self.gid).map_err(|e| format!("setgid({}): {e}", self.gid))?;
        setuid(self.uid).map_err(|e| format!("setuid({}): {e}", self.uid))?;
        let holds = getuid() == self.uid
            && geteuid() == self.uid
            && getgid() == self.gid
            && getegid() == self.gid;
        // Having dropped root, getting it back must be impossible.
        let can_regain_root =
            changing_user && self.uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok();
        if !holds || can_regain_root {
            return Err(format!(
                "still running as uid {} gid {} after the switch",
                geteuid(),
                getegid()
            ));
        }
        Ok(())
    }
}
