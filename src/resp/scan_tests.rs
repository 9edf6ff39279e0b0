use super::*;

fn frames(input: &[u8]) -> Vec<usize> {
    let mut sc = ReplyScanner::new();
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some(f) = sc.scan(&input[pos..]).unwrap() {
        out.push(f.len);
        pos += f.len;
    }
    out
}

#[test]
fn resp2_types() {
    assert_eq!(
        frames(b"+OK\r\n-ERR x\r\n:5\r\n$3\r\nfoo\r\n$-1\r\n*-1\r\n"),
        vec![5, 8, 4, 9, 5, 5]
    );
    let nested = b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n";
    assert_eq!(frames(nested), vec![nested.len()]);
}

#[test]
fn resp3_types() {
    let map = b"%2\r\n+a\r\n:1\r\n+b\r\n_\r\n";
    assert_eq!(frames(map), vec![map.len()]);
    let attr = b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n";
    assert_eq!(
        frames(attr),
        vec![attr.len()],
        "an attribute belongs to the next frame"
    );
    let nested_attr = b"*2\r\n|1\r\n+a\r\n:1\r\n:2\r\n:3\r\n";
    assert_eq!(frames(nested_attr), vec![nested_attr.len()]);
    let misc = b",1.5\r\n#t\r\n(123\r\n=7\r\ntxt:abc\r\n!3\r\nerr\r\n~1\r\n:1\r\n";
    assert_eq!(frames(misc).len(), 6);
    let streamed = b"$?\r\n;2\r\nab\r\n;0\r\n*?\r\n:1\r\n.\r\n";
    assert_eq!(frames(streamed), vec![16, 11]);
}

#[test]
fn push_frames_are_marked() {
    let mut sc = ReplyScanner::new();
    let f = sc.scan(b">2\r\n+message\r\n+x\r\n").unwrap().unwrap();
    assert!(f.push);
    let f = sc.scan(b"*1\r\n>1\r\n:1\r\n").unwrap().unwrap();
    assert!(!f.push);
}

#[test]
fn resumes_across_reads() {
    let whole = b"*3\r\n$5\r\nhello\r\n:42\r\n*2\r\n+a\r\n+b\r\n";
    for cut in 0..whole.len() {
        let mut sc = ReplyScanner::new();
        let first = sc.scan(&whole[..cut]).unwrap();
        assert!(first.is_none(), "cut {cut}");
        assert_eq!(
            sc.scan(whole).unwrap().unwrap().len,
            whole.len(),
            "cut {cut}"
        );
    }
}

/// Replies of any depth are framed (Redis returns Lua tables nested thousands deep), and a
/// chain of one-element aggregates costs one stack entry.
#[test]
fn any_depth_is_framed_with_a_bounded_stack() {
    for depth in [1usize, 2, 512, 513, 600, 5_000, 200_000] {
        let mut deep = b"*1\r\n".repeat(depth);
        deep.extend_from_slice(b":1\r\n");
        let mut sc = ReplyScanner::new();
        assert_eq!(frames(&deep), vec![deep.len()], "depth {depth}");
        // Fed in two halves, the scanner holds one entry for the whole chain.
        assert_eq!(sc.scan(&deep[..deep.len() / 2]), Ok(None));
        assert!(
            sc.stack.len() <= 1,
            "depth {depth}: {} entries",
            sc.stack.len()
        );
        assert_eq!(sc.scan(&deep).unwrap().unwrap().len, deep.len());
        assert!(sc.stack.is_empty());
    }
    // Wider nesting (two elements per level) keeps its levels apart and still frames.
    let mut wide = Vec::new();
    for _ in 0..10_000 {
        wide.extend_from_slice(b"*2\r\n:0\r\n");
    }
    wide.extend_from_slice(b"_\r\n");
    assert_eq!(frames(&wide), vec![wide.len()]);
    // A chain that is followed by more frames at an outer level.
    let mixed = b"*2\r\n*1\r\n*1\r\n*1\r\n:1\r\n+after\r\n:9\r\n";
    assert_eq!(frames(mixed), vec![mixed.len() - 4, 4]);
    let attr_chain = b"*1\r\n|1\r\n+a\r\n:1\r\n*1\r\n:2\r\n";
    assert_eq!(frames(attr_chain), vec![attr_chain.len()]);
}

#[test]
fn garbage_is_invalid() {
    assert_eq!(
        ReplyScanner::new().scan(b"hello\r\n"),
        Err(ScanError::Invalid)
    );
    assert_eq!(
        ReplyScanner::new().scan(b"$-5\r\n"),
        Err(ScanError::Invalid)
    );
}
