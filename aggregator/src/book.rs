//! The peer book as the agents receive it: bounded pages of changes (`Directive.peer_book_delta`)
//! rather than the whole book per agent per change. Pure: a stream keeps the last book it sent
//! (an `Arc` of the published one, shared by every stream) and pages the diff to the next.
//!
//! Sending the whole book (up to ~900 KiB) to every stream on every change made each stream's
//! encode buffer grow to the book's size and keep it: O(N) memory per agent, O(N²) in all.

use std::collections::BTreeMap;

use graywatch_proto::v1::{NodePeers, PeerBookDelta};
use prost::Message;

/// The published peer book: node name → its entry.
pub type Book = BTreeMap<String, NodePeers>;

/// Largest `Directive` carrying a page, encoded. A single node's entry larger than this (one with
/// thousands of reported IPv6 pod IPs; at most `MAX_POD_ADDRESSES` of them, ~200 KiB) goes alone
/// in its own page. No larger than what the stream's encoder hands on at once
/// ([`graywatch_proto::BOOK_PAGE_BYTES`]): each stream's encode buffer keeps the largest size it
/// grew to, for the stream's lifetime (with 32 KiB pages, ~32–64 KiB per agent).
pub const PAGE_BYTES: usize = graywatch_proto::BOOK_PAGE_BYTES;

/// Room for the `Directive` around a page: `protocol_version`, the oneof tag and length, `reset`
/// and `more`.
const PAGE_OVERHEAD: usize = 16;

/// One change to the agent's book.
enum Change<'a> {
    Upsert(&'a NodePeers),
    Remove(&'a str),
}

/// The pages that bring an agent holding `sent` to `book`, produced one at a time (a stream
/// holds at most one page besides what its channel buffers). With `sent` `None` the first page
/// has `reset` and the pages carry the whole book. Empty when nothing changed.
///
/// The changes are found as the pages are made, walking both books in order: a stream paging a
/// book holds no list of its N changes (at 10,000 nodes, 10,000 streams connecting at once each
/// held one of 240 KiB).
pub struct Pages<'a> {
    sent: Option<&'a Book>,
    book: &'a Book,
    /// Names of `sent` still to check for removal (walked first), then `book`'s entries.
    removals: std::collections::btree_map::Keys<'a, String, NodePeers>,
    upserts: std::collections::btree_map::Iter<'a, String, NodePeers>,
    next: Option<Change<'a>>,
    reset: bool,
    limit: usize,
}

impl<'a> Pages<'a> {
    #[must_use]
    pub fn new(sent: Option<&'a Book>, book: &'a Book) -> Self {
        Self::with_limit(sent, book, PAGE_BYTES)
    }

    /// As [`Pages::new`] with pages of at most `limit` bytes (tests).
    #[must_use]
    pub fn with_limit(sent: Option<&'a Book>, book: &'a Book, limit: usize) -> Self {
        static EMPTY: Book = Book::new();
        let mut pages = Self {
            sent,
            book,
            removals: sent.unwrap_or(&EMPTY).keys(),
            upserts: book.iter(),
            next: None,
            // With `reset` an empty book still yields one (empty) page: it clears what the agent held.
            reset: sent.is_none(),
            limit,
        };
        pages.next = pages.next_change();
        pages
    }

    /// The next change in order: removals (names of `sent` gone from `book`), then upserts (every
    /// entry of `book` without `sent`, the new or changed ones with it).
    fn next_change(&mut self) -> Option<Change<'a>> {
        let book = self.book;
        if let Some(name) = self.removals.find(|name| !book.contains_key(*name)) {
            return Some(Change::Remove(name));
        }
        let sent = self.sent;
        self.upserts
            .find(|(name, entry)| sent.is_none_or(|s| s.get(*name) != Some(*entry)))
            .map(|(_, entry)| Change::Upsert(entry))
    }
}

impl Iterator for Pages<'_> {
    type Item = PeerBookDelta;

    fn next(&mut self) -> Option<PeerBookDelta> {
        if self.next.is_none() && !self.reset {
            return None;
        }
        let mut page = PeerBookDelta {
            reset: std::mem::take(&mut self.reset),
            ..PeerBookDelta::default()
        };
        let mut bytes = PAGE_OVERHEAD;
        while let Some(change) = self.next.take() {
            let size = match &change {
                Change::Upsert(entry) => entry.encoded_len(),
                Change::Remove(name) => name.len(),
            };
            // Tag and length prefix of the repeated field.
            let size = size + 1 + prost::encoding::encoded_len_varint(size as u64);
            let empty = page.upsert.is_empty() && page.remove.is_empty();
            if bytes + size > self.limit && !empty {
                self.next = Some(change);
                break;
            }
            bytes += size;
            match change {
                Change::Upsert(entry) => page.upsert.push(entry.clone()),
                Change::Remove(name) => page.remove.push(name.to_owned()),
            }
            self.next = self.next_change();
        }
        page.more = self.next.is_some();
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graywatch_proto::v1::{Directive, directive};

    fn entry(name: &str, pods: usize) -> NodePeers {
        NodePeers {
            node_name: name.into(),
            addresses: vec![format!("10.0.0.{}", name.len())],
            pod_cidrs: (0..pods).map(|i| format!("10.1.{}.{}/32", i / 256, i % 256)).collect(),
        }
    }

    fn book(entries: impl IntoIterator<Item = NodePeers>) -> Book {
        entries.into_iter().map(|e| (e.node_name.clone(), e)).collect()
    }

    /// Applies pages as the agent does (see agent peers.rs), asserting the run's shape.
    fn apply(held: &mut Book, pages: &[PeerBookDelta]) {
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(page.more, i + 1 < pages.len(), "only the last page ends the run");
            if page.reset {
                held.clear();
            }
            for name in &page.remove {
                held.remove(name);
            }
            for e in &page.upsert {
                held.insert(e.node_name.clone(), e.clone());
            }
        }
    }

    fn encoded(page: &PeerBookDelta) -> usize {
        Directive {
            protocol_version: u32::MAX,
            kind: Some(directive::Kind::PeerBookDelta(page.clone())),
        }
        .encoded_len()
    }

    #[test]
    fn a_large_book_goes_in_pages_under_the_limit_first_one_resetting() {
        // ~3,000 nodes with 30 pod IPs each: ~1.7 MiB, over the old 900 KiB single message.
        let full = book((0..3_000).map(|i| entry(&format!("node-{i}"), 30)));
        let pages: Vec<_> = Pages::new(None, &full).collect();
        assert!(pages.len() > 30, "{} pages", pages.len());
        for (i, page) in pages.iter().enumerate() {
            assert!(encoded(page) <= PAGE_BYTES, "page {i}: {} bytes", encoded(page));
            assert_eq!(page.reset, i == 0, "page {i}");
            assert!(page.remove.is_empty());
        }
        let mut held = book([entry("stale", 1)]);
        apply(&mut held, &pages);
        assert_eq!(held, full, "reset drops what the agent held before");
    }

    #[test]
    fn a_change_sends_only_the_diff() {
        let old = book((0..100).map(|i| entry(&format!("node-{i}"), 3)));
        let mut new = old.clone();
        new.remove("node-7");
        new.insert("node-8".into(), entry("node-8", 4));
        new.insert("node-new".into(), entry("node-new", 1));
        let pages: Vec<_> = Pages::new(Some(&old), &new).collect();
        assert_eq!(pages.len(), 1);
        assert!(!pages[0].reset);
        assert_eq!(pages[0].remove, vec!["node-7".to_owned()]);
        let upserted: Vec<_> = pages[0].upsert.iter().map(|e| e.node_name.as_str()).collect();
        assert_eq!(upserted, ["node-8", "node-new"]);
        let mut held = old.clone();
        apply(&mut held, &pages);
        assert_eq!(held, new);
    }

    #[test]
    fn no_change_no_page_but_an_empty_book_still_resets() {
        let b = book([entry("a", 1)]);
        assert_eq!(Pages::new(Some(&b), &b).count(), 0);
        let empty = Book::new();
        let pages: Vec<_> = Pages::new(None, &empty).collect();
        assert_eq!(pages.len(), 1);
        assert!(pages[0].reset && pages[0].upsert.is_empty() && !pages[0].more);
        let mut held = b.clone();
        apply(&mut held, &pages);
        assert!(held.is_empty());
    }

    #[test]
    fn many_removes_are_paged_too_and_an_oversized_entry_goes_alone() {
        let old = book((0..200).map(|i| entry(&format!("node-with-a-long-name-{i:04}"), 0)));
        let mut new = book([entry("huge", 500)]);
        let pages: Vec<_> = Pages::with_limit(Some(&old), &new, 1024).collect();
        assert!(pages.len() > 3);
        for page in &pages[..pages.len() - 1] {
            assert!(encoded(page) <= 1024, "{} bytes", encoded(page));
            assert!(page.upsert.is_empty());
        }
        let last = pages.last().expect("pages");
        assert_eq!(last.upsert.len(), 1, "the entry over the limit alone");
        assert!(last.remove.is_empty());
        let mut held = old;
        apply(&mut held, &pages);
        assert_eq!(held, new);
        new.clear();
        assert_eq!(
            Pages::with_limit(Some(&held), &new, 1024)
                .map(|p| p.remove.len())
                .sum::<usize>(),
            1
        );
    }
}
