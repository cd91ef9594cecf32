// containerd-apply: containerd's own layer applier and Go's archive/tar reader, as a test
// oracle for the Python image service (tests/oracle/).
//
// Built offline from Debian's golang-go and golang-github-containerd-containerd-dev
// (containerd 1.6's source):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o containerd-apply .
//
// Usage:
//
//	containerd-apply apply DIR [PARENT...] < layer
//	                                     apply a layer (compressed or not) to DIR as
//	                                     containerd's overlayfs snapshotter does, with the
//	                                     lower layers' directories PARENT... (nearest
//	                                     first) for the parent directories it creates; on
//	                                     a rejected layer print the error, exit 1
//	containerd-apply list < layer        print Go archive/tar's headers as a JSON array
//	                                     (the last element is {"error": ...} on a reader
//	                                     error)
package main

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/archive"
	"github.com/containerd/containerd/archive/compression"
)

type entry struct {
	Name      string            `json:"name,omitempty"`
	Type      string            `json:"type,omitempty"`
	Size      int64             `json:"size"`
	Mode      int64             `json:"mode"`
	UID       int               `json:"uid"`
	GID       int               `json:"gid"`
	Linkname  string            `json:"linkname"`
	Devmajor  int64             `json:"devmajor"`
	Devminor  int64             `json:"devminor"`
	ModTime   int64             `json:"mtime"`
	PAX       map[string]string `json:"pax,omitempty"`
	Format    string            `json:"format"`
	Sparse    bool              `json:"sparse"`
	SHA256    string            `json:"sha256"`
	DataBytes int64             `json:"data_bytes"`
	Error     string            `json:"error,omitempty"`
}

func apply(dir string, parents []string) error {
	r, err := compression.DecompressStream(os.Stdin)
	if err != nil {
		return err
	}
	defer r.Close()
	// As containerd's diff applier does for an overlay mount (diff/apply/apply_linux.go).
	opts := []archive.ApplyOpt{archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)}
	if len(parents) > 0 {
		opts = append(opts, archive.WithParents(parents))
	}
	_, err = archive.Apply(context.Background(), dir, r, opts...)
	return err
}

func list() error {
	r, err := compression.DecompressStream(os.Stdin)
	if err != nil {
		return err
	}
	defer r.Close()
	tr := tar.NewReader(r)
	out := []entry{}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			out = append(out, entry{Error: err.Error()})
			break
		}
		h := sha256.New()
		n, err := io.Copy(h, tr)
		e := entry{
			Name:      hdr.Name,
			Type:      string([]byte{hdr.Typeflag}),
			Size:      hdr.Size,
			Mode:      hdr.Mode,
			UID:       hdr.Uid,
			GID:       hdr.Gid,
			Linkname:  hdr.Linkname,
			Devmajor:  hdr.Devmajor,
			Devminor:  hdr.Devminor,
			ModTime:   hdr.ModTime.Unix(),
			PAX:       hdr.PAXRecords,
			Format:    hdr.Format.String(),
			Sparse:    hdr.Typeflag == tar.TypeGNUSparse || hdr.PAXRecords["GNU.sparse.major"] != "" || hdr.PAXRecords["GNU.sparse.name"] != "",
			SHA256:    hex.EncodeToString(h.Sum(nil)),
			DataBytes: n,
		}
		out = append(out, e)
		if err != nil {
			out = append(out, entry{Error: err.Error()})
			break
		}
	}
	enc := json.NewEncoder(os.Stdout)
	return enc.Encode(out)
}

func main() {
	var err error
	switch {
	case len(os.Args) >= 3 && os.Args[1] == "apply":
		err = apply(os.Args[2], os.Args[3:])
	case len(os.Args) == 2 && os.Args[1] == "list":
		err = list()
	default:
		fmt.Fprintln(os.Stderr, "usage: containerd-apply apply DIR [PARENT...] < layer | containerd-apply list < layer")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
