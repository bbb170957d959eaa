//! Who owns a connection in transit: the settlement of one hand-over batch, as two
//! pure state machines (the sender's and the receiver's) and the bytes they exchange.
//!
//! Owns the decisions only; the sockets, the parcels and the epoll registration are
//! the caller's ([`super::Outgoing`], [`super::Incoming`]). The invariant a reader
//! must keep: **the sender decides, the receiver obeys, and each side's timeout only
//! ever gives up that side's own claim.**
//!
//! | step | sender (owns the batch until it grants)     | receiver                               |
//! |------|----------------------------------------------|----------------------------------------|
//! | 1    | sends the batch (+ the far end of a private socketpair); `Offered` | |
//! | 2    |                                              | takes it from the queue, writes `T`+gen (`Claimed`), serves none of it |
//! | 3    | reads `T`: writes `Y` (`Granted`)            |                                        |
//! | 4    |                                              | reads `Y`: writes `A`, **owns** and serves |
//! | 5    | reads `A`: closes its copies (`Taken`)       |                                        |
//!
//! Every other path, and what it means:
//! - the sender's deadline passes while `Offered` (nobody claimed in time): it writes
//!   `N` and serves the batch itself; a receiver that claims later reads `N` and drops
//!   its copies. While `Granted` the sender has no deadline: the receiver is alive
//!   and claimed, it answers when it runs.
//! - the receiver cannot read the batch: it writes `R` and drops it; the sender keeps.
//! - the sender sees the end of file before `T` (the receiver died or exited before
//!   claiming) or before `A` (before it read the grant, so before it served a byte):
//!   it keeps the batch.
//! - the receiver sees the end of file with no answer: the sender died (or exited at
//!   its own deadline) undecided, and its copies died with it: the receiver owns.
//!
//! A side that stalls for any time only delays the clients of the batch; a side
//! that dies loses only what it owned. `tests::every_interleaving_...` checks this
//! over every order of steps, with a death of either side at every step.

/// Receiver → sender: "I have taken the batch" (followed by the generation, 8 bytes LE).
pub const CLAIM: u8 = b'T';
/// Sender → receiver: "it is yours".
pub const GRANT: u8 = b'Y';
/// Sender → receiver: "too late, I keep it".
pub const KEEP: u8 = b'N';
/// Receiver → sender: "I cannot read this batch".
pub const REFUSE: u8 = b'R';
/// Receiver → sender: "I have it, close your copies".
pub const ACK: u8 = b'A';
/// Length of a claim on the wire.
pub const CLAIM_LEN: usize = 9;

/// The sender's view of one batch it offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offer {
    /// Sent; nobody has claimed it yet. Still the sender's.
    Offered,
    /// Claimed and granted to a worker of `generation`; waiting for its ack.
    Granted { generation: u64 },
}

/// What the sender learns about a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderInput {
    Claimed {
        generation: u64,
    },
    Refused,
    Acked,
    /// End of file or an error on the settle socket: the receiver is gone.
    Closed,
    /// The sender's own deadline for the offer passed.
    Deadline,
}

/// What the sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderStep {
    /// Nothing yet; the offer is now in this state.
    Wait(Offer),
    /// Write [`GRANT`]; the offer is now `Granted`.
    Grant { generation: u64 },
    /// Settled: the batch stays with the sender, who serves it. `tell`: write
    /// [`KEEP`] first (a receiver may still claim it).
    Keep { tell: bool },
    /// Settled: the receiver has it; the sender closes its copies.
    Taken { generation: u64 },
}

/// The sender's rule.
pub fn sender_step(offer: Offer, input: SenderInput) -> SenderStep {
    use SenderInput::*;
    match (offer, input) {
        (Offer::Offered, Claimed { generation }) => SenderStep::Grant { generation },
        (Offer::Offered, Refused | Closed) => SenderStep::Keep { tell: false },
        // Nobody claimed in time (or an ack for nothing): take the offer back.
        (Offer::Offered, Deadline | Acked) => SenderStep::Keep { tell: true },
        (Offer::Granted { generation }, Acked) => SenderStep::Taken { generation },
        // Gone before it read the grant: it never served a byte of these.
        (Offer::Granted { .. }, Closed) => SenderStep::Keep { tell: false },
        // A live receiver claimed: no timeout takes the grant back.
        (granted @ Offer::Granted { .. }, Deadline | Claimed { .. } | Refused) => {
            SenderStep::Wait(granted)
        }
    }
}

/// What the receiver of a claimed batch learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverInput {
    Granted,
    Kept,
    /// End of file (or an error) with no answer: the sender is gone undecided.
    Closed,
}

/// What the receiver does with a claimed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverStep {
    /// Write [`ACK`] (if the sender is still there) and serve the batch.
    Own,
    /// Close its copies: the sender serves them.
    Drop,
}

/// The receiver's rule.
pub fn receiver_step(input: ReceiverInput) -> ReceiverStep {
    match input {
        ReceiverInput::Granted => ReceiverStep::Own,
        ReceiverInput::Kept => ReceiverStep::Drop,
        // The sender's copies died with it: nobody else holds these.
        ReceiverInput::Closed => ReceiverStep::Own,
    }
}

/// Reads the receiver's answer bytes: the input they make, and how many bytes they
/// used (0: not enough yet).
pub fn parse_for_sender(bytes: &[u8]) -> (Option<SenderInput>, usize) {
    match bytes.first() {
        None => (None, 0),
        Some(&CLAIM) if bytes.len() >= CLAIM_LEN => {
            let generation = u64::from_le_bytes(bytes[1..CLAIM_LEN].try_into().expect("8 bytes"));
            (Some(SenderInput::Claimed { generation }), CLAIM_LEN)
        }
        Some(&CLAIM) => (None, 0),
        Some(&REFUSE) => (Some(SenderInput::Refused), 1),
        Some(&ACK) => (Some(SenderInput::Acked), 1),
        // Garbage: treat the receiver as gone (the sender keeps).
        Some(_) => (Some(SenderInput::Closed), bytes.len()),
    }
}

/// Reads the sender's answer byte.
pub fn parse_for_receiver(byte: u8) -> ReceiverInput {
    match byte {
        GRANT => ReceiverInput::Granted,
        KEEP => ReceiverInput::Kept,
        // Anything else is a broken sender: what it meant is unknown, so the safe
        // reading is that it keeps them (it holds its copies until it settles).
        _ => ReceiverInput::Kept,
    }
}

/// The claim bytes a receiver of `generation` writes.
pub fn claim(generation: u64) -> [u8; CLAIM_LEN] {
    let mut bytes = [0u8; CLAIM_LEN];
    bytes[0] = CLAIM;
    bytes[1..].copy_from_slice(&generation.to_le_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    //! An exhaustive explorer: one batch, its sender, and up to two receivers (the
    //! second one arrives only if the first died before taking the batch from the
    //! queue, as a replacement worker would). Every process may take its next step,
    //! or die, at every point; the sender's deadline may fire at any moment (which
    //! covers every stall of any length of either side). After every step no two
    //! processes serve the connection; in every final state exactly one process
    //! serves it and holds the only copy, or no copy is left (the client is told).

    use super::*;
    use std::collections::{HashSet, VecDeque};

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Sender {
        Offered(Offer),
        /// Keeps the batch and serves it (copies held).
        Serving,
        /// Closed its copies after `Taken`.
        Done,
        Dead,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Receiver {
        /// Has not taken the batch.
        Waiting,
        Claimed,
        Serving,
        /// Closed its copies (dropped or refused).
        Dropped,
        /// Died before taking the batch.
        DeadBefore,
        /// Died after taking it (its copies and its settle end closed).
        DeadAfter,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct World {
        sender: Sender,
        receivers: [Receiver; 2],
        /// Which receiver took the batch, if one did.
        taker: Option<usize>,
        to_receiver: VecDeque<u8>,
        to_sender: VecDeque<u8>,
        /// The sender's settle end is closed.
        sender_end_closed: bool,
    }

    impl World {
        fn start() -> World {
            World {
                sender: Sender::Offered(Offer::Offered),
                receivers: [Receiver::Waiting; 2],
                taker: None,
                to_receiver: VecDeque::new(),
                to_sender: VecDeque::new(),
                sender_end_closed: false,
            }
        }

        /// The receiver whose turn it is to take the batch.
        fn active_receiver(&self) -> usize {
            if self.receivers[0] == Receiver::DeadBefore {
                1
            } else {
                0
            }
        }

        /// The far end is closed once a receiver took it and let it go.
        fn receiver_end_closed(&self) -> bool {
            self.taker.is_some_and(|r| {
                matches!(self.receivers[r], Receiver::Dropped | Receiver::DeadAfter)
                    || (self.receivers[r] == Receiver::Serving)
            })
        }

        fn servers(&self) -> usize {
            usize::from(self.sender == Sender::Serving)
                + self
                    .receivers
                    .iter()
                    .filter(|r| **r == Receiver::Serving)
                    .count()
        }

        /// Processes (or the queue) that hold a copy of the connection.
        fn holders(&self) -> usize {
            let sender = matches!(self.sender, Sender::Offered(_) | Sender::Serving);
            let queue = self.taker.is_none();
            let receivers = self
                .receivers
                .iter()
                .filter(|r| matches!(r, Receiver::Claimed | Receiver::Serving))
                .count();
            usize::from(sender) + usize::from(queue) + receivers
        }

        fn successors(&self) -> Vec<(String, World)> {
            let mut next = Vec::new();
            // The sender's steps.
            if let Sender::Offered(offer) = self.sender {
                let mut inputs = vec![(SenderInput::Deadline, 0)];
                let bytes: Vec<u8> = self.to_sender.iter().copied().collect();
                match parse_for_sender(&bytes) {
                    (Some(input), used) => inputs.push((input, used)),
                    (None, _) if self.receiver_end_closed() => {
                        inputs.push((SenderInput::Closed, 0))
                    }
                    (None, _) => {}
                }
                for (input, used) in inputs {
                    let mut w = self.clone();
                    w.to_sender.drain(..used);
                    match sender_step(offer, input) {
                        SenderStep::Wait(o) => w.sender = Sender::Offered(o),
                        SenderStep::Grant { generation } => {
                            w.to_receiver.push_back(GRANT);
                            w.sender = Sender::Offered(Offer::Granted { generation });
                        }
                        SenderStep::Keep { tell } => {
                            if tell {
                                w.to_receiver.push_back(KEEP);
                            }
                            w.sender = Sender::Serving;
                            w.sender_end_closed = true;
                        }
                        SenderStep::Taken { .. } => {
                            w.sender = Sender::Done;
                            w.sender_end_closed = true;
                        }
                    }
                    if w != *self {
                        next.push((format!("sender {input:?}"), w));
                    }
                }
            }
            if matches!(self.sender, Sender::Offered(_) | Sender::Serving) {
                let mut w = self.clone();
                w.sender = Sender::Dead;
                w.sender_end_closed = true;
                next.push(("sender dies".to_string(), w));
            }
            // The receivers' steps.
            let r = self.active_receiver();
            match self.receivers[r] {
                Receiver::Waiting => {
                    for readable in [true, false] {
                        let mut w = self.clone();
                        w.taker = Some(r);
                        if readable {
                            w.to_sender.extend(claim(7));
                            w.receivers[r] = Receiver::Claimed;
                        } else {
                            w.to_sender.push_back(REFUSE);
                            w.receivers[r] = Receiver::Dropped;
                        }
                        next.push((format!("receiver {r} takes (readable: {readable})"), w));
                    }
                    if r == 0 {
                        let mut w = self.clone();
                        w.receivers[0] = Receiver::DeadBefore;
                        next.push(("receiver 0 dies before taking".to_string(), w));
                    }
                }
                Receiver::Claimed => {
                    let input = match self.to_receiver.front() {
                        Some(&byte) => Some(parse_for_receiver(byte)),
                        None if self.sender_end_closed => Some(ReceiverInput::Closed),
                        None => None,
                    };
                    if let Some(input) = input {
                        let mut w = self.clone();
                        w.to_receiver.pop_front();
                        match receiver_step(input) {
                            ReceiverStep::Own => {
                                if !w.sender_end_closed {
                                    w.to_sender.push_back(ACK);
                                }
                                w.receivers[r] = Receiver::Serving;
                            }
                            ReceiverStep::Drop => w.receivers[r] = Receiver::Dropped,
                        }
                        next.push((format!("receiver {r} reads {input:?}"), w));
                    }
                    let mut w = self.clone();
                    w.receivers[r] = Receiver::DeadAfter;
                    next.push((format!("receiver {r} dies holding a claim"), w));
                }
                Receiver::Serving => {
                    let mut w = self.clone();
                    w.receivers[r] = Receiver::DeadAfter;
                    next.push((format!("receiver {r} dies serving"), w));
                }
                Receiver::Dropped | Receiver::DeadBefore | Receiver::DeadAfter => {}
            }
            next
        }
    }

    #[test]
    fn every_interleaving_with_a_death_anywhere_ends_with_one_owner_or_the_client_told() {
        let mut seen: HashSet<World> = HashSet::new();
        let mut todo: VecDeque<(World, Vec<String>)> = VecDeque::new();
        todo.push_back((World::start(), Vec::new()));
        let mut finals = 0;
        let mut outcomes: HashSet<(usize, bool)> = HashSet::new();
        while let Some((world, path)) = todo.pop_front() {
            if !seen.insert(world.clone()) {
                continue;
            }
            assert!(world.servers() <= 1, "two owners after {path:?}: {world:?}");
            let next = world.successors();
            // A final state: only deaths of what already serves remain possible.
            let progress: Vec<_> = next
                .iter()
                .filter(|(step, _)| !step.contains("dies"))
                .collect();
            if progress.is_empty() {
                finals += 1;
                let holders = world.holders();
                let ok = (world.servers() == 1 && holders == 1) || holders == 0;
                assert!(
                    ok,
                    "ends with {} serving and {holders} holding after {path:?}: {world:?}",
                    world.servers()
                );
                outcomes.insert((world.servers(), holders == 0));
            }
            for (step, w) in next {
                let mut path = path.clone();
                path.push(step);
                todo.push_back((w, path));
            }
        }
        // Both endings are reachable, and the exploration is not trivially small.
        assert!(outcomes.contains(&(1, false)) && outcomes.contains(&(0, true)));
        assert!(seen.len() > 50 && finals > 10, "{} states", seen.len());
    }

    #[test]
    fn the_sender_keeps_what_nobody_claimed_and_grants_what_was_claimed() {
        use SenderInput::*;
        let offered = Offer::Offered;
        assert_eq!(
            sender_step(offered, Deadline),
            SenderStep::Keep { tell: true }
        );
        assert_eq!(
            sender_step(offered, Claimed { generation: 3 }),
            SenderStep::Grant { generation: 3 }
        );
        let granted = Offer::Granted { generation: 3 };
        assert_eq!(sender_step(granted, Deadline), SenderStep::Wait(granted));
        assert_eq!(
            sender_step(granted, Acked),
            SenderStep::Taken { generation: 3 }
        );
        assert_eq!(
            sender_step(granted, Closed),
            SenderStep::Keep { tell: false }
        );
    }

    #[test]
    fn a_receiver_owns_on_a_grant_or_an_undecided_death_only() {
        assert_eq!(receiver_step(ReceiverInput::Granted), ReceiverStep::Own);
        assert_eq!(receiver_step(ReceiverInput::Closed), ReceiverStep::Own);
        assert_eq!(receiver_step(ReceiverInput::Kept), ReceiverStep::Drop);
        assert_eq!(parse_for_receiver(b'?'), ReceiverInput::Kept);
    }

    #[test]
    fn answers_parse_only_when_whole() {
        let c = claim(9);
        assert_eq!(parse_for_sender(&c[..4]), (None, 0));
        assert_eq!(
            parse_for_sender(&c),
            (Some(SenderInput::Claimed { generation: 9 }), CLAIM_LEN)
        );
        assert_eq!(parse_for_sender(b"A"), (Some(SenderInput::Acked), 1));
    }
}
