//! A worker's connection table: its connections by epoll token, and the turns they
//! are owed.
//!
//! Owns the slots, their reuse and the list of connections that used up their turn
//! with input still waiting; it does no I/O (the worker registers and serves). The
//! invariant: a slot freed while a batch of epoll events is being handled is reused
//! only after the batch ([`Table::end_of_batch`]), so a stale event later in the
//! same batch can never reach a new client in that slot. (That rule is why this is
//! not the `slab` crate, whose vacant keys are reused at once.)

/// Slots of `T` (a connection) by index, the index being its epoll token.
pub struct Table<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    /// Freed during the current batch of events: reusable after it.
    released: Vec<usize>,
    /// Owed another turn this pass, and the spare list swapped in while they take it.
    again: Vec<usize>,
    again_spare: Vec<usize>,
    open: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            released: Vec::new(),
            again: Vec::new(),
            again_spare: Vec::new(),
            open: 0,
        }
    }
}

impl<T> Table<T> {
    /// The index a new entry will get from [`Table::insert_at`].
    pub fn vacant(&mut self) -> usize {
        match self.free.last() {
            Some(&index) => index,
            None => {
                self.slots.push(None);
                self.free.push(self.slots.len() - 1);
                self.slots.len() - 1
            }
        }
    }

    /// Puts `value` in the slot [`Table::vacant`] named.
    pub fn insert_at(&mut self, index: usize, value: T) {
        debug_assert_eq!(self.free.last(), Some(&index));
        self.free.pop();
        debug_assert!(self.slots[index].is_none());
        self.slots[index] = Some(value);
        self.open += 1;
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.slots.get_mut(index)?.as_mut()
    }

    /// Takes the entry out; its slot is reused after this batch of events.
    pub fn remove(&mut self, index: usize) -> Option<T> {
        let value = self.slots.get_mut(index)?.take()?;
        self.open -= 1;
        self.released.push(index);
        Some(value)
    }

    /// Entries in the table.
    pub fn open(&self) -> usize {
        self.open
    }

    /// One past the highest slot ever used (to scan every index).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// `index` is owed another turn this pass.
    pub fn again(&mut self, index: usize) {
        self.again.push(index);
    }

    pub fn any_again(&self) -> bool {
        !self.again.is_empty()
    }

    /// The indices owed a turn; the list starts empty again (no allocation: it is
    /// swapped with a spare that [`Table::return_again`] gives back).
    pub fn take_again(&mut self) -> Vec<usize> {
        std::mem::replace(&mut self.again, std::mem::take(&mut self.again_spare))
    }

    pub fn return_again(&mut self, mut spare: Vec<usize>) {
        spare.clear();
        self.again_spare = spare;
    }

    /// The batch of events is handled: slots freed in it may be reused.
    pub fn end_of_batch(&mut self) {
        self.free.append(&mut self.released);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_freed_in_a_batch_is_reused_only_after_it() {
        let mut t: Table<&str> = Table::default();
        let a = t.vacant();
        t.insert_at(a, "a");
        assert_eq!(t.remove(a), Some("a"));
        let b = t.vacant();
        assert_ne!(a, b, "reused within the batch");
        t.insert_at(b, "b");
        t.end_of_batch();
        assert_eq!(t.vacant(), a);
        assert_eq!(t.open(), 1);
        assert_eq!(t.remove(a), None, "an empty slot removes nothing");
        assert_eq!(t.open(), 1);
    }

    #[test]
    fn turns_owed_come_back_once() {
        let mut t: Table<u8> = Table::default();
        t.again(3);
        t.again(5);
        let owed = t.take_again();
        assert_eq!(owed, vec![3, 5]);
        assert!(!t.any_again());
        t.return_again(owed);
        assert!(t.take_again().is_empty());
    }
}
