//! Synthetic but realistic deal-event streams, for benchmarks and load tests.
//!
//! [`Generator`] yields valid CloudEvents for many deals at once, interleaved,
//! each deal walking a plausible lifecycle (opened, rounds of proposals and
//! counters, acceptance, finalization, exclusivity locks, amendments, now and
//! then a termination) so that the fold accepts them. It is deterministic
//! for a given seed and needs no randomness source: a small xorshift PRNG is
//! enough for shaping data.

use crate::event::{
    Amended, Amount, BoundedList, Capacity, CapacityUnit, Currency, DealEvent, ExclusivityGranted,
    ExclusivityReleased, Finalized, Id, LockKind, Money, NegotiationOpened, Payload, Signatory,
    Terms, TermsAccepted, TermsCountered, TermsProposed, Text, Timestamp,
};

/// Parties deals are drawn between.
const CUSTOMERS: [&str; 8] = [
    "openai",
    "anthropic",
    "meta",
    "mistral",
    "xai",
    "cohere",
    "perplexity",
    "character-ai",
];
const PROVIDERS: [&str; 6] = [
    "google-cloud",
    "microsoft",
    "aws",
    "oracle",
    "coreweave",
    "lambda",
];
const UNITS: [CapacityUnit; 4] = [
    CapacityUnit::GpuHours,
    CapacityUnit::TpuChips,
    CapacityUnit::Megawatts,
    CapacityUnit::Gpus,
];

/// Where one generated deal is in its lifecycle.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    New,
    Negotiating { round: u32 },
    Agreed,
    Finalized,
    Locked,
}

#[derive(Clone, Debug)]
struct DealCursor {
    id: Id,
    customer: usize,
    provider: usize,
    stage: Stage,
    /// The open proposal, and who made it (true = customer).
    open: Option<(Id, bool)>,
    proposals: u32,
    amendments: u32,
    locks: u32,
}

/// An endless, deterministic stream of valid deal events over `deals` deals.
pub struct Generator {
    state: u64,
    deals: Vec<DealCursor>,
    /// Business time of the next event, in seconds since the epoch.
    clock: i64,
    next_event: u64,
    seed: u64,
    source: String,
}

impl Generator {
    /// A generator over `deals` deals (at least 1), shaped by `seed`.
    pub fn new(deals: usize, seed: u64) -> Self {
        assert!(deals >= 1, "a generator needs at least one deal");
        let mut g = Generator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            deals: Vec::with_capacity(deals),
            clock: 1_704_067_200, // 2024-01-01T00:00:00Z
            next_event: 0,
            seed,
            source: "urn:dealledger:generator".to_string(),
        };
        for i in 0..deals {
            let customer = g.below(CUSTOMERS.len() as u64) as usize;
            let provider = g.below(PROVIDERS.len() as u64) as usize;
            g.deals.push(DealCursor {
                id: Id::new(format!("deal-{seed}-{i:07}")).expect("valid id"),
                customer,
                provider,
                stage: Stage::New,
                open: None,
                proposals: 0,
                amendments: 0,
                locks: 0,
            });
        }
        g
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn terms(&mut self, start: i64) -> Terms {
        let unit = UNITS[self.below(UNITS.len() as u64) as usize];
        let months = 12 + self.below(48) as i64;
        Terms {
            capacity: Capacity {
                quantity: Amount::new(1_000 + self.below(5_000_000)).expect("small"),
                unit,
            },
            price: Money {
                amount_minor: Amount::new(100_000_000 + self.below(1_000_000_000_000))
                    .expect("small"),
                currency: Currency::new("USD").expect("valid"),
            },
            start: ts(start + 30 * 86_400),
            end: ts(start + (30 + months * 30) * 86_400),
        }
    }

    fn party(&self, d: &DealCursor, customer: bool) -> Id {
        let name = if customer {
            CUSTOMERS[d.customer]
        } else {
            PROVIDERS[d.provider]
        };
        Id::new(name).expect("valid id")
    }

    /// The next event of the stream.
    pub fn next_event(&mut self) -> DealEvent {
        let i = self.below(self.deals.len() as u64) as usize;
        self.clock += 1 + self.below(120) as i64;
        let now = self.clock;
        let mut d = self.deals[i].clone();
        let customer = self.party(&d, true);
        let provider = self.party(&d, false);
        let payload = match d.stage {
            Stage::New => {
                d.stage = Stage::Negotiating { round: 0 };
                Payload::NegotiationOpened(NegotiationOpened {
                    customer,
                    provider,
                    partners: BoundedList::default(),
                    scope: Id::new("cloud-compute").expect("valid id"),
                    description: Some(
                        Text::new("Generated capacity deal for load testing").expect("short"),
                    ),
                })
            }
            Stage::Negotiating { round } => {
                let rounds_wanted = 1 + (self.below(4) as u32);
                match d.open.clone() {
                    None => {
                        d.proposals += 1;
                        let pid = Id::new(format!("p{}", d.proposals)).expect("valid id");
                        d.open = Some((pid.clone(), true));
                        let terms = self.terms(now);
                        Payload::TermsProposed(TermsProposed {
                            proposal_id: pid,
                            proposer: customer,
                            terms,
                        })
                    }
                    Some((open, by_customer)) if round < rounds_wanted && d.proposals < 900 => {
                        d.proposals += 1;
                        let pid = Id::new(format!("p{}", d.proposals)).expect("valid id");
                        d.open = Some((pid.clone(), !by_customer));
                        d.stage = Stage::Negotiating { round: round + 1 };
                        let terms = self.terms(now);
                        Payload::TermsCountered(TermsCountered {
                            proposal_id: pid,
                            counters: open,
                            proposer: if by_customer { provider } else { customer },
                            terms,
                        })
                    }
                    Some((open, by_customer)) => {
                        d.stage = Stage::Agreed;
                        Payload::TermsAccepted(TermsAccepted {
                            proposal_id: open,
                            accepted_by: if by_customer { provider } else { customer },
                        })
                    }
                }
            }
            Stage::Agreed => {
                d.stage = Stage::Finalized;
                let (pid, _) = d
                    .open
                    .clone()
                    .expect("an agreed deal has an accepted proposal");
                Payload::Finalized(Finalized {
                    proposal_id: pid,
                    signatories: BoundedList::new(vec![
                        Signatory {
                            party: customer,
                            name: Text::new("Chief Executive Officer").expect("short"),
                            title: None,
                        },
                        Signatory {
                            party: provider,
                            name: Text::new("Head of Cloud Sales").expect("short"),
                            title: None,
                        },
                    ])
                    .expect("two signatories"),
                    effective_date: crate::event::Date::parse(&ts(now).to_string()[..10])
                        .expect("date"),
                    terms: None,
                })
            }
            Stage::Finalized if self.below(4) == 0 && d.locks < 50 => {
                d.stage = Stage::Locked;
                d.locks += 1;
                Payload::ExclusivityGranted(ExclusivityGranted {
                    lock_id: Id::new(format!("lock-{}", d.locks)).expect("valid id"),
                    holder: provider,
                    bound_party: customer,
                    scope: Id::new("cloud-compute").expect("valid id"),
                    kind: LockKind::RightOfFirstRefusal,
                    valid_from: ts(now),
                    valid_until: None,
                })
            }
            Stage::Locked if self.below(8) == 0 => {
                d.stage = Stage::Finalized;
                Payload::ExclusivityReleased(ExclusivityReleased {
                    lock_id: Id::new(format!("lock-{}", d.locks)).expect("valid id"),
                    reason: Text::new("Superseded by the amended agreement").expect("short"),
                })
            }
            Stage::Finalized | Stage::Locked => {
                if d.amendments >= 900 {
                    // Keep deals within the fold's limits: start a fresh deal in this slot.
                    let fresh =
                        Id::new(format!("{}-r{}", d.id, self.next_event)).expect("valid id");
                    self.deals[i] = DealCursor {
                        id: fresh,
                        stage: Stage::New,
                        open: None,
                        proposals: 0,
                        amendments: 0,
                        locks: 0,
                        ..d
                    };
                    return self.next_event();
                }
                d.amendments += 1;
                let terms = self.terms(now);
                Payload::Amended(Amended {
                    amendment_id: Id::new(format!("a{}", d.amendments)).expect("valid id"),
                    terms,
                    agreed_by: BoundedList::new(vec![customer, provider]).expect("two parties"),
                    reason: Some(Text::new("Capacity expansion").expect("short")),
                })
            }
        };
        let event = DealEvent::new(
            format!("gen-{}-{:012}", self.seed, self.next_event),
            self.source.clone(),
            d.id.clone(),
            ts(now),
            payload,
        );
        self.next_event += 1;
        self.deals[i] = d;
        event
    }
}

impl Iterator for Generator {
    type Item = DealEvent;
    fn next(&mut self) -> Option<DealEvent> {
        Some(self.next_event())
    }
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_unix_millis(secs * 1000).expect("in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_valid_and_accepted_by_the_fold() {
        let a: Vec<Vec<u8>> = Generator::new(50, 7)
            .take(20_000)
            .map(|e| e.to_json())
            .collect();
        let b: Vec<Vec<u8>> = Generator::new(50, 7)
            .take(2_000)
            .map(|e| e.to_json())
            .collect();
        let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(
            first_difference, None,
            "the same seed gave different streams"
        );
        let mut book = crate::deal::DealBook::new();
        for bytes in &a {
            let event = DealEvent::decode(bytes).expect("generated events are valid");
            book.apply(&event)
                .unwrap_or_else(|r| panic!("the fold rejects a generated event: {r}"));
        }
        let mean = a.iter().map(Vec::len).sum::<usize>() / a.len();
        assert!((250..700).contains(&mean), "mean event size {mean} bytes");
    }
}
