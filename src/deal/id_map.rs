//! `IdMap`: the small per-deal collections (proposals, locks, parties' maps),
//! sorted vectors of (id, value) instead of hash maps.

use super::*;

/// A map from [`Id`] to `V`, kept as one vector sorted by id, for the
/// per-deal maps (proposals, locks, the index's lock entries): each holds at
/// most a few hundred entries, and a B-tree's half-empty nodes cost more
/// than the entries themselves (a deal's locks took ~490 bytes each as a
/// `BTreeMap`). Grows by a quarter at a time. Same order, same API subset
/// and same JSON (an object) as a `BTreeMap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap<V> {
    pub(super) entries: Vec<(Id, V)>,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap {
            entries: Vec::new(),
        }
    }
}

impl<V> IdMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn position(&self, id: &Id) -> Result<usize, usize> {
        self.entries.binary_search_by(|(key, _)| key.cmp(id))
    }

    /// The value of `id`.
    pub fn get(&self, id: &Id) -> Option<&V> {
        self.position(id).ok().map(|i| &self.entries[i].1)
    }

    /// The value of `id`, to change it.
    pub fn get_mut(&mut self, id: &Id) -> Option<&mut V> {
        self.position(id).ok().map(|i| &mut self.entries[i].1)
    }

    /// Whether `id` has a value.
    pub fn contains_key(&self, id: &Id) -> bool {
        self.position(id).is_ok()
    }

    /// Sets the value of `id`, returning the one it replaces.
    pub fn insert(&mut self, id: Id, value: V) -> Option<V> {
        match self.position(&id) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                if self.entries.len() == self.entries.capacity() {
                    self.entries.reserve_exact((self.entries.len() / 4).max(1));
                }
                self.entries.insert(i, (id, value));
                None
            }
        }
    }

    /// Removes `id`, returning its value.
    pub fn remove(&mut self, id: &Id) -> Option<V> {
        self.position(id).ok().map(|i| self.entries.remove(i).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in id order.
    pub fn iter(&self) -> IdMapIter<'_, V> {
        self.entries.iter().map(|(id, value)| (id, value))
    }

    /// Ids in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &Id> + ExactSizeIterator {
        self.entries.iter().map(|(id, _)| id)
    }

    /// Values in id order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, value)| value)
    }

    /// Entries in id order, values to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Id, &mut V)> {
        self.entries.iter_mut().map(|(id, value)| (&*id, value))
    }

    /// Values in id order, to change them.
    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.entries.iter_mut().map(|(_, value)| value)
    }
}

/// The iterator of [`IdMap::iter`].
pub type IdMapIter<'a, V> =
    std::iter::Map<std::slice::Iter<'a, (Id, V)>, fn(&'a (Id, V)) -> (&'a Id, &'a V)>;

impl<'a, V> IntoIterator for &'a IdMap<V> {
    type Item = (&'a Id, &'a V);
    type IntoIter = IdMapIter<'a, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// An entry of one of two [`IdMap`]s walked together by [`merged`].
pub(super) enum Either<'a, A, B> {
    /// From the first map.
    First(&'a Id, &'a A),
    /// From the second map.
    Second(&'a Id, &'a B),
}

/// The entries of two maps with no id in common, in id order (the per-deal
/// maps that keep locks apart by whether they ended).
pub(super) fn merged<'a, A, B>(
    first: &'a IdMap<A>,
    second: &'a IdMap<B>,
) -> impl Iterator<Item = Either<'a, A, B>> {
    let mut first = first.iter().peekable();
    let mut second = second.iter().peekable();
    std::iter::from_fn(move || {
        let from_first = match (first.peek(), second.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((a, _)), Some((b, _))) => a < b,
        };
        Some(if from_first {
            let (id, value) = first.next().expect("peeked");
            Either::First(id, value)
        } else {
            let (id, value) = second.next().expect("peeked");
            Either::Second(id, value)
        })
    })
}

impl<V> std::ops::Index<&Id> for IdMap<V> {
    type Output = V;
    fn index(&self, id: &Id) -> &V {
        self.get(id)
            .unwrap_or_else(|| panic!("no entry for id {id} in the map"))
    }
}

impl<V> FromIterator<(Id, V)> for IdMap<V> {
    fn from_iter<I: IntoIterator<Item = (Id, V)>>(items: I) -> Self {
        let mut map = IdMap::new();
        for (id, value) in items {
            map.insert(id, value);
        }
        map
    }
}

impl<V: Serialize> Serialize for IdMap<V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for IdMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = IdMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object keyed by identifiers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<IdMap<V>, A::Error> {
                let mut entries: Vec<(Id, V)> = Vec::new();
                while let Some((id, value)) = access.next_entry::<Id, V>()? {
                    entries.push((id, value));
                }
                entries.shrink_to_fit();
                // Written in order; sorted anyway, then checked for repeats.
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
                    return Err(serde::de::Error::custom(format!(
                        "identifier {} appears twice",
                        w[0].0
                    )));
                }
                Ok(IdMap { entries })
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}
