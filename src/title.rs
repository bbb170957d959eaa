//! The process title: what `ps`, `top -c` and /proc/PID/cmdline show, and the comm.
//!
//! Owns the argv area of the process. Linux lets a process overwrite the memory that
//! held its arguments (and the environment strings right after them); the kernel then
//! reports that text as the command line. `init` moves the environment strings to
//! the heap so the whole area can be written, and must run before the title is first
//! set; after that `std::env::args()` returns garbage, so the caller keeps the
//! original arguments itself. The title is also copied to forked workers, which set
//! their own.
//!
//! The comm (15 bytes, seen by `pgrep -x`, `top`, `ps -o comm`) is set separately.

use std::ffi::{CStr, CString};
use std::io;
use std::sync::Mutex;

/// The writable argv area: start address and length in bytes.
static AREA: Mutex<Option<(usize, usize)>> = Mutex::new(None);

/// Claims the argv area (and the environment strings after it) for titles.
pub fn init() -> io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the comm, which is in parentheses and may itself hold spaces.
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unreadable /proc/self/stat"))?;
    let fields: Vec<usize> = after_comm
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // proc(5): arg_start, arg_end, env_start and env_end are fields 48 to 51; the
    // slice starts at field 3.
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    let (arg_start, arg_end, env_start, env_end) = (field(48), field(49), field(50), field(51));
    if arg_start == 0 || arg_end <= arg_start {
        return Err(io::Error::other("no argv area in /proc/self/stat"));
    }
    let end = if env_start == arg_end && env_end > env_start {
        move_environment_out_of(env_start, env_end);
        env_end
    } else {
        arg_end
    };
    *AREA.lock().unwrap_or_else(|e| e.into_inner()) = Some((arg_start, end - arg_start));
    Ok(())
}

/// Points every `environ` entry that lies in [start, end) at a heap copy, so that
/// getenv and child processes keep seeing the environment once titles overwrite it.
fn move_environment_out_of(start: usize, end: usize) {
    // SAFETY: raasd is single-threaded when `init` runs, so nothing reads or changes
    // `environ` meanwhile; the array is NULL-terminated and each entry is a
    // NUL-terminated string (the C runtime's contract). The copies are leaked on
    // purpose: they must live as long as the process.
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let addr = *entry as usize;
            if (start..end).contains(&addr) {
                let copy = CString::from(CStr::from_ptr(*entry));
                *entry = copy.into_raw();
            }
            entry = entry.add(1);
        }
    }
}

/// Sets the title; text beyond the area's length is cut.
pub fn set(title: &str) {
    let Some((start, len)) = *AREA.lock().unwrap_or_else(|e| e.into_inner()) else {
        return;
    };
    let text = title.as_bytes();
    let n = text.len().min(len - 1);
    // SAFETY: [start, start+len) is this process's argv (and environment) area, read
    // from /proc/self/stat by `init`; it is mapped, writable (it is on the stack) and
    // no longer referenced by anything: `environ` was moved out of it and raasd never
    // reads the original argv again.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&text[..n]);
        area[n..].fill(0);
    }
}

/// Sets the comm (cut to 15 bytes by the kernel).
/// ` NAME` in a title, when --name is set (nothing otherwise).
pub fn name_part(name: Option<&str>) -> String {
    name.map(|n| format!(" {n}")).unwrap_or_default()
}

pub fn set_comm(name: &str) {
    if let Ok(name) = CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}
